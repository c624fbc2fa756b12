"""Assembly: turn a validated :class:`~contrastlab.config.schema.Config` into datasets, views and models.

This is the only place that reads config sections to call the building blocks' constructors, so the
blocks themselves stay free of config objects and usable on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from contrastlab.config.load import planner_settings
from contrastlab.config.schema import Config
from contrastlab.data import build_dataset, native_size
from contrastlab.data import normalization as dataset_normalization
from contrastlab.data.device_images import DeviceImages
from contrastlab.data.download import download_dataset
from contrastlab.data.subsets import class_balanced_subset, evenly_spaced
from contrastlab.errors import ConfigError
from contrastlab.methods import METHODS, build_method
from contrastlab.methods.base import Method
from contrastlab.models.backbones import backbone_options, build_backbone
from contrastlab.models.cohort import build_cohort
from contrastlab.observers.knn_monitor import KNNMonitor
from contrastlab.registry import PLANNERS
from contrastlab.views import ViewDataset, eval_view_dataset, make_photometric
from contrastlab.views.joint_blur import JointBlur
from contrastlab.views.planners.base import Planner, PlannerContext


def dataset(cfg: Config, split: str) -> Dataset:
    """The raw dataset of ``split`` (``(PIL image, label, index)`` items)."""
    if cfg.data.download:  # fetch and verify the files unless they are in place (data.download)
        download_dataset(cfg.data.name, cfg.data.root, cfg.data.download_mirror, cfg.data.download_checksums)
    kwargs = {"class_list": cfg.data.class_list} if cfg.data.class_list is not None else {}
    return build_dataset(cfg.data.name, cfg.data.root, split, **kwargs)


def training_dataset(cfg: Config) -> Dataset:
    """The pre-training split, or an evenly spaced ``data.subset`` of it (indices renumbered from 0)."""
    base = dataset(cfg, cfg.data.train_split)
    n = cfg.data.subset
    if n < 0:
        raise ConfigError(f"data.subset must be >= 0 (0 = the whole split), got {n}")
    return evenly_spaced(base, n)


def labeled_dataset(cfg: Config, train_base: Dataset | None = None) -> Dataset:
    """The labelled training split (kNN bank, linear-probe training): ``data.labeled_split`` or the training
    split (``train_base`` when given, so it is not loaded twice)."""
    split = cfg.data.labeled_split or cfg.data.train_split
    if train_base is not None and split == cfg.data.train_split:
        return train_base
    return dataset(cfg, split)


def image_size(cfg: Config) -> int:
    """Training crop side: ``data.image_size`` or the dataset's native size."""
    return cfg.data.image_size or native_size(cfg.data.name)


def normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-dataset mean and std."""
    return dataset_normalization(cfg.data.name)


def planner(cfg: Config, num_images: int) -> Planner:
    """The crop law ``views.planner`` configured by its ``views.*`` keys, for ``num_images`` training images."""
    context = PlannerContext(image_size=image_size(cfg), num_images=num_images)
    return PLANNERS[cfg.views.planner].from_settings(planner_settings(cfg.views), context)


def training_views(cfg: Config, base: Dataset) -> ViewDataset:
    """The multi-view training dataset: planner boxes, rendered, per-view photometric recipe.

    Random draws are seeded per sample from ``(seed, epoch, index)``: the trainer calls ``set_epoch``.
    """
    law = planner(cfg, len(base))
    sizes = law.view_sizes(image_size(cfg))
    mean, std = normalization(cfg)
    photometrics = [make_photometric(cfg.views.photometric, view=i, mean=mean, std=std) for i in range(len(sizes))]
    joint_blur, independent = _joint_blur(cfg, law, photometrics)
    return ViewDataset(base, law, sizes, photometrics, seed=cfg.seed, joint_blur=joint_blur,
                       independent_planner=independent)


def _joint_blur(cfg: Config, law: Planner, photometrics: list) -> tuple[JointBlur | None, Planner | None]:
    """``views.joint_blur``: the JointBlur sampler and, for mode ``either``, the independent-crop planner."""
    v = cfg.views
    if v.joint_blur == "off":
        return None, None
    if not any(getattr(p, "blur_prob", 0.0) > 0 for p in photometrics[:2]):
        raise ConfigError(f"views.joint_blur={v.joint_blur!r} draws the blur of the pair jointly, but photometric "
                          f"{v.photometric!r} never blurs; use simclr, mocov2 or byol")
    sigma = photometrics[0].blur_sigma
    joint_blur = JointBlur(mode=v.joint_blur, beta=v.joint_blur_beta, sigma=sigma, epsilon=v.joint_blur_epsilon)
    if v.joint_blur != "either":
        return joint_blur, None
    independent = law.independent()
    if independent is None:
        raise ConfigError(f"views.joint_blur=either picks JointCrop or JointBlur per pair and needs a planner with "
                          f"an independent counterpart (views.planner=joint_crop), got {v.planner!r}")
    return joint_blur, independent


def evaluation_views(cfg: Config, base: Dataset) -> Dataset:
    """One deterministic view per image for kNN and feature extraction."""
    mean, std = normalization(cfg)
    return eval_view_dataset(base, image_size(cfg), mean, std, crop_fraction=cfg.linear.crop_fraction)


def knn_monitor(cfg: Config, bank_base: Dataset, test_base: Dataset, device: torch.device,
                batch_size: int = 256, on_device: bool = False, store: DeviceImages | None = None,
                test_loader: object = None) -> KNNMonitor:
    """The kNN monitor of ``cfg.monitor`` over evaluation views of the bank and test datasets (rendered on
    ``device`` with ``on_device``; ``store``: ``bank_base`` already held there; ``test_loader``: ready test batches)."""
    m = cfg.monitor
    bank: Dataset = evaluation_views(cfg, bank_base)
    if m.bank_fraction < 1.0:
        bank = Subset(bank, class_balanced_subset(bank_base.targets, m.bank_fraction))
    return KNNMonitor(bank, evaluation_views(cfg, test_base), len(bank_base.classes),
                      k=m.knn_k, temperature=m.knn_temperature, batch_size=batch_size, workers=cfg.data.workers,
                      max_bank=m.max_bank, max_test=m.max_test, bank_fraction=m.bank_fraction, device=device,
                      on_device=on_device, store=store, test_loader=test_loader)


def _backbone_kwargs(cfg: Config) -> dict:
    """The ``model.*`` options for the backbone builder of ``model.arch``: each one the builder accepts, and any
    other only when it is set away from its default (then the builder's rejection names it)."""
    m = cfg.model
    accepted = backbone_options(m.arch)
    given = {"cifar_stem": (m.cifar_stem, False), "zero_init_residual": (m.zero_init_residual, False),
             "width": (m.width, 1.0), "stop_grad_conv1": (m.stop_grad_conv1, False),
             "drop_path_rate": (m.drop_path_rate, 0.0),
             "img_size": (image_size(cfg), None)}
    kwargs = {k: v for k, (v, default) in given.items() if k in accepted or (default is not None and v != default)}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"model.{unknown[0]}={kwargs[unknown[0]]!r} is not an option of backbone {m.arch!r} (its "
                          f"options: {', '.join(accepted) or 'none'}); leave it at its default")
    return kwargs


def backbone(cfg: Config) -> tuple[nn.Module, int]:
    """The backbone (for a cohort method: one peer) and its feature dimension."""
    return build_backbone(cfg.model.arch, **_backbone_kwargs(cfg))


def method(cfg: Config, num_classes: int, targets: Sequence[int] | None = None) -> Method:
    """The method around fresh networks: a backbone, or a cohort of ``model.peers`` for cohort methods.

    ``num_classes`` and the training labels ``targets`` are passed to methods whose constructor takes
    ``num_classes`` / ``dataset_targets``.
    """
    from contrastlab.config.load import method_parameters

    m = cfg.model
    if METHODS[cfg.method.name].takes_cohort:
        net: nn.Module = build_cohort(m.arch, m.peers, m.shared_until, **_backbone_kwargs(cfg))
        dim = net.feature_dim
    else:
        if m.peers != 1 or m.shared_until is not None:
            cohort_methods = ", ".join(name for name, cls in METHODS.items() if cls.takes_cohort)
            raise ConfigError(f"model.peers={m.peers} / model.shared_until={m.shared_until!r} need a cohort method "
                              f"({cohort_methods}); method {cfg.method.name!r} trains one network (model.peers=1)")
        net, dim = backbone(cfg)
    params = dict(cfg.method.params)
    accepted = method_parameters(cfg.method.name)
    if "num_classes" in accepted and "num_classes" not in params:
        params["num_classes"] = num_classes
    if "dataset_targets" in accepted and "dataset_targets" not in params:
        params["dataset_targets"] = targets
    if "backbone_factory" in accepted and "backbone_factory" not in params:  # more networks of the same kind
        params["backbone_factory"] = lambda: backbone(cfg)[0]
    return build_method(cfg.method.name, net, dim, **params)
