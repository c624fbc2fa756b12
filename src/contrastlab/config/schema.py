"""The typed configuration schema: one dataclass per section of a recipe.

A recipe YAML fills these sections; ``key=value`` overrides change single fields. Values derived from
others (the scaled learning rate, the number of steps) are never stored here: they are computed after
the overrides by :mod:`contrastlab.config.derived`.

The ``method`` section is open: besides ``name`` it takes the keyword arguments of the chosen method's
constructor (see :mod:`contrastlab.methods`), validated against that constructor's signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    name: str = "demo"  #: dataset registry name (contrastlab.data.DATASETS)
    root: str | None = None  #: folder holding the dataset files (unused by ``demo``)
    train_split: str = "train"  #: split used for pre-training (and as the kNN bank)
    test_split: str = "test"  #: split used for kNN / linear-probe accuracy
    labeled_split: str | None = None  #: labelled split for the kNN bank and linear-probe training; None = train_split
    class_list: str | None = None  #: ImageFolder subset file (one class folder per line)
    batch_size: int = 256  #: GLOBAL batch size, split evenly over ranks
    sampler: Literal["random", "m_per_class"] = "random"  #: random (a permutation per epoch) | m_per_class (MCL: batch_size / m classes x m images)
    samples_per_class: int = 2  #: m of the m_per_class sampler
    epoch_length: int = 0  #: images per epoch before trimming to whole batches; 0 = the dataset size
    subset: int = 0  #: train on an evenly spaced subset of this many training images (0 = all; smoke runs: 64)
    bad_images: Literal["fail", "skip"] = "fail"  #: unreadable image files: fail (naming the file) | skip (counted, listed in <out>/bad_images.txt)
    workers: int = 4  #: DataLoader workers per rank
    pipeline: Literal["auto", "gpu", "cpu"] = "auto"  #: gpu (dataset held on the device, views rendered there in batches) | cpu (DataLoader workers) | auto (gpu when training on a GPU and the dataset fits)
    compile_views: bool = False  #: gpu pipeline: torch.compile the batched renderer (its element-wise ops fused into a few kernels; compiled on the first batch)
    image_size: int | None = None  #: training crop size; None = the dataset's native size
    download: bool = False  #: fetch and verify (MD5) the dataset into data.root if it is not there: cifar10, cifar100, stl10, fashion_mnist, tiny_imagenet
    download_mirror: str | None = None  #: base URL replacing the upstream hosts: each file is fetched as <mirror>/<file name>
    download_checksums: str | None = None  #: md5sum-format file ("<md5>  <file name>" lines) replacing the published MD5s of the files it names (a mirror's own files)


@dataclass
class ViewsConfig:
    """How the views of each image are planned (boxes) and rendered (photometric recipe).

    Besides the keys below, the section holds the chosen planner's own keys (``num_views``, ``scale``, ``ratio``,
    ``ccrop_alpha``, ``joint_beta``, ...): each planner declares them in its ``Settings``
    (:mod:`contrastlab.views.planners`); they are checked against it when the config loads and kept, with the
    planner's defaults filled in, in ``params``. ``train RECIPE --show`` lists them.
    """

    planner: str = "random_resized"  #: a crop law of contrastlab.views.planners (random_resized | multicrop | joint_crop | contrastive_crop | semantic_crop | simccrop | padded_crop | fixed | center) or one registered with contrastlab.register_planner
    photometric: str = "small"  #: simclr | mocov2 | mocov1 | byol | dino | byol_small | swav | vicreg_cifar | small | none | eval, or one registered with contrastlab.register_photometric
    joint_blur: Literal["off", "always", "either"] = "off"  #: off | always (the pair's blur sigmas drawn jointly) | either (per pair JointCrop or JointBlur, p 0.5)
    joint_blur_beta: float = 0.0  #: JointBlur: shape of the log-sigma-ratio law (a reconstruction)
    joint_blur_epsilon: float = 0.1  #: JointBlur: bound log(sigma_max / sigma_min - epsilon)
    params: dict[str, Any] = field(default_factory=dict)  #: the planner's own keys (flattened into ``views`` in YAML)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _planner_params(self.planner, self.params))

    def __getattr__(self, name: str) -> Any:
        """A key of the chosen planner: ``cfg.views.scale`` reads ``cfg.views.params["scale"]``."""
        params = self.__dict__.get("params") or {}
        if name in params:
            return params[name]
        raise AttributeError(f"views has no key {name!r}: planner {self.__dict__.get('planner')!r} reads "
                             f"{', '.join(sorted(params)) or 'no keys of its own'}")

    def __setattr__(self, name: str, value: Any) -> None:
        """The section's own fields are set as usual; setting ``planner`` keeps the planner keys the new planner
        reads and fills in its defaults for the others; a planner key sets ``params``; any other name is an error
        (a key the planner does not read would silently do nothing)."""
        params = self.__dict__.get("params")
        if name == "planner" and params is not None and value != self.__dict__.get("planner"):
            object.__setattr__(self, "planner", value)
            object.__setattr__(self, "params", _planner_params(value, params, keep_known_only=True))
        elif name in _VIEWS_FIELDS or params is None:
            object.__setattr__(self, name, value)
        elif name in params:
            params[name] = value
        else:
            raise AttributeError(f"views.{name} is not a key of planner {self.planner!r} (its keys: "
                                 f"{', '.join(sorted(params)) or 'none'})")


_VIEWS_FIELDS = ("planner", "photometric", "joint_blur", "joint_blur_beta", "joint_blur_epsilon", "params")


def _planner_params(planner: str, given: dict[str, Any], keep_known_only: bool = False) -> dict[str, Any]:
    """The keys of ``planner``'s ``Settings`` with their defaults, updated by ``given`` (unknown names are left for
    the config's validation to report, unless ``keep_known_only``); ``given`` as is for an unknown planner."""
    import dataclasses

    from contrastlab.registry import PLANNERS

    if not isinstance(planner, str) or planner not in PLANNERS:
        return dict(given)
    defaults = {f.name: getattr(PLANNERS[planner].Settings(), f.name)
                for f in dataclasses.fields(PLANNERS[planner].Settings)}
    extra = {} if keep_known_only else {k: v for k, v in given.items() if k not in defaults}
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}, **extra}


@dataclass
class ModelConfig:
    """The backbone."""

    arch: str = "resnet18"  #: a name of contrastlab.models.BACKBONES (`contrastlab.models` docs)
    cifar_stem: bool = False  #: 3x3 stride-1 first conv and no max-pool (torchvision ResNets)
    width: float = 1.0  #: width multiplier (CIFAR ResNets)
    zero_init_residual: bool = False
    stop_grad_conv1: bool = False  #: ViTs: frozen random patch projection (MoCo v3)
    evaluated_network: str = "online"  #: online | momentum: the backbone kNN, linear probe and export read (DINO: the teacher)
    drop_path_rate: float = 0.0  #: ViTs: stochastic depth of the trained network (DINO's student: 0.1; its teacher has none)
    sync_bn: bool = False  #: convert BatchNorm to SyncBatchNorm under DDP
    channels_last: bool = False
    peers: int = 1  #: cohort methods (mcl, moco_mcl): number of peer networks M
    shared_until: str | None = None  #: cohort trunk: None (independent peers), a stage name, or "upstream"


@dataclass
class MethodConfig:
    """The self-supervised method: ``name`` plus its constructor's keyword arguments."""

    name: str = "simclr"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    ``lr`` is the learning rate at a global batch of ``base_batch_size``; with ``scale_lr`` the
    learning rate used is ``lr * batch_size / base_batch_size`` (linear scaling, Goyal et al. 2017).
    """

    name: str = "sgd"  #: sgd | lars | adamw
    lr: float = 0.1
    base_batch_size: int = 256
    scale_lr: bool = True
    weight_decay: float = 1e-4
    momentum: float = 0.9  #: SGD / LARS momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  #: AdamW
    nesterov: bool = False
    exclude_bias_bn_wd: bool = False  #: no weight decay on 1-D parameters (biases, norms)
    lars_trust_coefficient: float = 0.001
    larc_clip: bool = False  #: larc: clipping mode, each parameter's rate min(eta ||w|| / (||g|| + wd ||w||), lr) (apex LARC clip=True; solo-learn's LARS clip_lr)
    larc_exclude: bool = False  #: larc: plain SGD without weight decay for biases and norms (groups flagged exclude_from_lars; solo-learn's exclude_bias_n_norm)
    schedule: str = "cosine"  #: cosine | step | constant
    warmup_epochs: float = 0.0  #: linear warm-up, per iteration
    warmup_start_lr: float = 0.0  #: scaled with ``lr`` (per-iteration warm-up only)
    final_lr: float = 0.0  #: cosine end value, scaled with ``lr`` (CaCo: lr 0.3 -> final 0.003)
    final_lr_ratio: float | None = None  #: cosine end value as a fraction of the peak lr, following lr overrides (ContrastiveCrop's decay_rate 0.1); set, it replaces final_lr
    milestones: list[int] = field(default_factory=list)  #: step schedule: epochs
    gamma: float = 0.1  #: step schedule factor (ContrastiveCrop's MoCo v1 configs had 0: lr 0 after the first milestone)
    clip_grad: float = 0.0  #: max gradient norm; 0 disables clipping
    clip_grad_mode: Literal["global", "per_parameter"] = "global"  #: global: one norm over all gradients; per_parameter: each parameter's own (DINO's clip_gradients)
    weight_decay_end: float | None = None  #: cosine from weight_decay to this over the run, per step (DINO: 0.04 -> 0.4); None keeps it constant
    bias_bn_lr_scale: float = 1.0  #: learning-rate factor of 1-D parameters (biases, norms): Barlow Twins' LARS has lr_biases = lr_weights * 0.024


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 100
    max_steps: int = 0  #: stop after this many optimiser steps in total (0 = no limit)
    device: Literal["auto", "cpu", "cuda"] = "auto"  #: auto | cpu | cuda
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  #: fp32 | bf16 | fp16
    ema_momentum: float = 0.99  #: momentum encoders (MoCo, BYOL)
    ema_schedule: str = "constant"  #: constant | cosine (to 1.0, BYOL)
    schedule_unit: Literal["step", "epoch"] = "step"  #: step | epoch: whether lr, EMA momentum and method schedules change per step or per epoch
    checkpoint_every: int = 10  #: epochs between numbered checkpoints (last.pt is written every epoch)
    keep_checkpoints: int = 0  #: keep only the newest K numbered checkpoints (0 = keep all)
    checkpoint_every_steps: int = 0  #: also write last.pt every N steps, mid-epoch (0 = at epoch ends only)
    nonfinite: Literal["stop", "skip"] = "stop"  #: a non-finite loss or gradient: stop (with a message) | skip (the step, counted)
    finite_check_every: int = 1  #: steps between host reads of the non-finite check; > 1 lets the GPU run ahead (a bad step then stops the run up to N - 1 steps late; nonfinite=stop only)
    max_skipped_steps: int = 100  #: nonfinite=skip: stop after this many skipped steps in the run
    log_every: int = 20  #: steps between progress lines
    compile: Literal["none", "default", "reduce-overhead", "max-autotune", "eager"] = "none"  #: none | default | reduce-overhead (CUDA graphs) | max-autotune: torch.compile the step's forward; eager = Dynamo tracing only
    deterministic: bool = False  #: torch.use_deterministic_algorithms
    lock_timeout: float = 300.0  #: seconds: a run-directory lock (<out>/run.lock) whose holder on another host stopped refreshing it this long ago is taken over


@dataclass
class MonitorConfig:
    """Settings of the monitors (observers ``knn`` and ``test_accuracy``): the online kNN monitor (Wu et al. 2018
    weighted voting) on backbone features, its collapse guard, and the test accuracy of a method's classifiers."""

    knn_every: int = 10  #: epochs between evaluations; 0 disables; the last epoch is always evaluated
    knn_every_epoch_until: int = 0  #: also evaluate after every epoch up to this one (CaCo: 20)
    knn_k: int = 200
    knn_temperature: float = 0.1
    bank_fraction: float = 1.0  #: bank = the first fraction of each class of the training split (CaCo: 0.2)
    max_bank: int = 0  #: use at most this many training images as the bank (0 = all)
    max_test: int = 0  #: use at most this many test images (0 = all)
    classify_every: int = 0  #: methods with classifiers: epochs between test-set accuracy (0 = final epoch only)
    collapse_threshold: float = 0.0  #: stop when kNN top-1 (%) <= this at epoch >= collapse_after_epoch; 0 = off
    collapse_after_epoch: int = 20  #: first epoch the collapse guard may stop the run (CaCo: 20)


DEFAULT_OBSERVERS = ("progress", "knn", "test_accuracy", "localiser", "plots")
"""The observers of a run unless a recipe lists its own; each builds nothing where it does not apply."""


@dataclass
class LogConfig:
    """Where the scalars of a run go (loggers, registered in ``contrastlab.observers.loggers``; rank 0 only)."""

    to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  #: loggers: jsonl (metrics.jsonl) | tensorboard | wandb | mlflow (extras: pip install "contrastlab[wandb]" / "contrastlab[mlflow]")
    project: str = "contrastlab"  #: wandb project / MLflow experiment
    run_name: str = ""  #: wandb / MLflow run name; empty = the run directory's name
    mlflow_uri: str = ""  #: MLflow tracking URI; empty = a file store in <out>/mlruns


@dataclass
class LinearConfig:
    """Linear probe on the frozen backbone (eval mode), final-epoch accuracy."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 10.0
    optimizer: str = "sgd"  #: sgd | lars | larc (LARC-wrapped SGD, CaCo)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  #: cosine | step | constant
    milestones: list[int] = field(default_factory=list)
    augment: bool = True  #: RandomResizedCrop + flip each epoch; False = features computed once
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  #: RandomResizedCrop area range
    crop_fraction: float = 1.0  #: eval views: centre crop fraction (0.875 for ImageNet)
    n_last_blocks: int = 1  #: ViTs: class tokens of the last N blocks, concatenated (DINO's ViT-S probe: 4)
    avgpool_patch_tokens: bool = False  #: ViTs: last class token and mean patch token (DINO's ViT-B probe)
    max_train: int = 0  #: train the probe on an evenly spaced subset of this many labelled images (0 = all; smoke stages: 256)
    max_test: int = 0  #: score it on an evenly spaced subset of this many test images (0 = all; smoke stages: 256)


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning with a linear head (DeiT's recipe, as MoCo v3 fine-tuned its ViTs), final-epoch accuracy.

    The defaults are DeiT's ``main.py`` defaults, except the schedule (``cosine``: per step); ``finetune/``
    recipes set what the released runs used. See :mod:`contrastlab.eval.finetune`.
    """

    epochs: int = 100
    batch_size: int = 1024  #: GLOBAL batch, split evenly over ranks
    lr: float = 5.0e-4  #: at base_batch_size; the rate used is lr * batch_size / base_batch_size
    base_batch_size: int = 512
    weight_decay: float = 0.05  #: AdamW; none on biases, norms, the position embedding and the class token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5.0
    warmup_lr: float = 1.0e-6  #: the warm-up starts here (not scaled)
    min_lr: float = 1.0e-5  #: the cosine ends here (not scaled)
    schedule: str = "cosine"  #: cosine (per step: linear warm-up from warmup_lr, cosine to min_lr) | deit (DeiT's release: timm's cosine once per epoch, each epoch at the rate computed for the one before)
    clip_grad: float = 0.0  #: max gradient norm; 0 disables clipping
    clip_grad_mode: Literal["global", "per_parameter"] = "global"  #: global: one norm over all gradients; per_parameter: each parameter's own (DINO's clip_gradients)
    weight_decay_end: float | None = None  #: cosine from weight_decay to this over the run, per step (DINO: 0.04 -> 0.4); None keeps it constant
    bias_bn_lr_scale: float = 1.0  #: learning-rate factor of 1-D parameters (biases, norms): Barlow Twins' LARS has lr_biases = lr_weights * 0.024
    drop_path: float = 0.1  #: stochastic depth of a ViT (timm's drop_path_rate)
    label_smoothing: float = 0.1
    mixup: float = 0.8  #: mixup alpha (timm Mixup); 0 = off
    cutmix: float = 1.0  #: cutmix alpha; 0 = off
    mixup_prob: float = 1.0  #: probability of mixing a batch
    mixup_switch_prob: float = 0.5  #: probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  #: batch | pair | elem (timm Mixup)
    randaugment: str = "rand-m9-mstd0.5-inc1"  #: timm auto_augment policy string; empty = none
    color_jitter: float = 0.4
    interpolation: str = "bicubic"  #: training crops: bicubic | bilinear | random
    reprob: float = 0.25  #: random erasing probability
    remode: str = "pixel"  #: random erasing fill: pixel | rand | const
    recount: int = 1  #: random erasing count
    repeated_aug: int = 3  #: each image this many times per epoch, on different ranks (DeiT's RASampler); 1 = off
    ema_decay: float = 0.99996  #: EMA of the weights (timm ModelEmaV2), reported as an extra; 0 = off
    precision: str = "fp32"  #: fp32 | bf16 | fp16 (autocast; fp16 with a loss scaler)
    crop_fraction: float = 0.875  #: test views: resize to size / crop_fraction, centre crop
    eval_every: int = 0  #: epochs between test-set evaluations (0 = the final epoch only)


@dataclass
class Config:
    """A whole run."""

    description: str = ""
    out: str = ""  #: run directory; empty = runs/<recipe name>
    seed: int = 0
    resume: str | None = None  #: a checkpoint path, or "auto" (the run directory's last.pt)
    overwrite: bool = False  #: start afresh even if ``out`` already holds a run
    plugins: list[str] = field(default_factory=list)  #: modules or .py files imported before the config's names are checked (they register methods, crop laws, datasets, ...)
    observers: list[str] = field(default_factory=lambda: list(DEFAULT_OBSERVERS))  #: what watches the run, called in order: progress | knn | test_accuracy | localiser | plots | score_statistics (FT's tool, <out>/scores) | any registered with contrastlab.register_observer
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    notes: ClassVar[tuple[str, ...]] = ()
    """What loading the config decided that a user may not expect (a switched method or planner and the inherited
    keys it dropped or kept): set per config by :func:`~contrastlab.config.load.load_config`, logged by the trainer,
    printed by ``--show``. Not a key: it is not saved."""
