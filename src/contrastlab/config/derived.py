"""Values derived from a config after overrides: scaled learning rate, per-rank batch, step counts.

They are computed, never written into recipes, so that changing ``data.batch_size`` or ``train.epochs``
on the command line changes them consistently (ContrastiveCrop's config system froze them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from contrastlab.config.schema import Config
from contrastlab.errors import ConfigError


@dataclass(frozen=True)
class Derived:
    """What the trainer computes from the config and the number of ranks."""

    world_size: int
    global_batch_size: int
    per_rank_batch_size: int
    lr: float  #: the learning rate actually used at the peak of the schedule
    final_lr: float  #: the cosine end value, scaled like ``lr``
    warmup_start_lr: float  #: the warm-up start value, scaled like ``lr``
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def lr_scale(cfg: Config) -> float:
    """``batch_size / base_batch_size`` when ``optim.scale_lr`` (linear scaling, Goyal et al. 2017), else 1."""
    return cfg.data.batch_size / cfg.optim.base_batch_size if cfg.optim.scale_lr else 1.0


def scaled_lr(cfg: Config) -> float:
    """``optim.lr`` scaled linearly by ``batch_size / base_batch_size`` when ``optim.scale_lr``."""
    return cfg.optim.lr * lr_scale(cfg)


def derive(cfg: Config, world_size: int, dataset_len: int) -> Derived:
    """Derive the run's numbers; ConfigError when the batch does not fit the ranks or the data."""
    batch = cfg.data.batch_size
    if batch <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {batch}")
    if batch % world_size:
        raise ConfigError(
            f"data.batch_size={batch} is the global batch and must be divisible by the {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    if cfg.optim.lr < 0:
        raise ConfigError(f"optim.lr must be >= 0, got {cfg.optim.lr}")
    per_rank = batch // world_size
    if cfg.data.epoch_length < 0:
        raise ConfigError(f"data.epoch_length must be >= 0 (0 = the dataset size), got {cfg.data.epoch_length}")
    steps = (cfg.data.epoch_length or dataset_len) // batch  # drop_last: every step sees a full global batch
    if steps == 0:
        raise ConfigError(
            f"data.batch_size={batch} is larger than the training set ({dataset_len} images); lower data.batch_size"
        )
    total = steps * cfg.train.epochs
    if cfg.train.max_steps > 0:
        total = min(total, cfg.train.max_steps)
    warmup = round(cfg.optim.warmup_epochs * steps)
    scale = lr_scale(cfg)
    return Derived(world_size, batch, per_rank, cfg.optim.lr * scale, final_lr(cfg),
                   cfg.optim.warmup_start_lr * scale, steps, total, warmup)


def final_lr(cfg: Config) -> float:
    """The cosine end value used: ``optim.final_lr_ratio`` times the scaled peak rate when set, else
    ``optim.final_lr`` scaled like the peak rate; ConfigError when both are set."""
    ratio = cfg.optim.final_lr_ratio
    if ratio is None:
        return cfg.optim.final_lr * lr_scale(cfg)
    if cfg.optim.final_lr:
        raise ConfigError(f"optim.final_lr={cfg.optim.final_lr} and optim.final_lr_ratio={ratio} both set the end of "
                          "the cosine; set one of them (the other to 0 / null)")
    return ratio * scaled_lr(cfg)
