"""ContrastiveCrop's localisation schedule as an observer: refresh every image's semantic box from heatmaps.

Peng, Wang, Zhang, Zhao, Zhou, Ni, "Crafting Better Contrastive Views for Siamese Representation Learning"
(CVPR 2022, section 3.2; xyupeng/ContrastiveCrop, ``DDP_moco_ccrop.py``): crops are plain random crops for the
warm-up epochs, then, at the end of every ``box_update_every``-th epoch after them (never after the last), the
online backbone's last feature map gives a heatmap per image, thresholded into the box the crop law samples
around (:func:`contrastlab.views.localiser.localise`). SemanticCrop (PRCV 2023) uses the same schedule.

The box table (:class:`~contrastlab.views.box_store.BoxStore`) is this observer's checkpointed state. The
``localiser`` entry of the config list ``observers`` builds it whenever the training crop law keeps a box store
(and the run fails at set-up if the list omits it: the boxes would never be refreshed); for other crop laws it
builds nothing.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Subset

from contrastlab.engine.checkpoint import UPGRADES
from contrastlab.observers.base import Observer, Run, evaluation_batch_size
from contrastlab.registry import register_observer
from contrastlab.views.box_store import BoxStore
from contrastlab.views.planners.base import Localisation


def box_law(run: Run) -> tuple[BoxStore, Localisation] | None:
    """The training crop law's box store and its localisation schedule (the planner's ``store`` and
    ``localisation``), or None when the law keeps no store that a localiser refreshes."""
    planner = run.train_views.planner
    schedule = getattr(planner, "localisation", None)
    return (planner.store, schedule) if schedule is not None and isinstance(planner.store, BoxStore) else None


class Localiser(Observer):
    """Refreshes a :class:`~contrastlab.views.box_store.BoxStore` on ContrastiveCrop's schedule (every rank).

    Args:
        store: The per-image boxes the crop law samples around.
        schedule: When and how (:class:`~contrastlab.views.planners.base.Localisation`: warm-up epochs, every,
            threshold, heatmap, box edges).
    """

    def __init__(self, store: BoxStore, schedule: Localisation) -> None:
        self.store, self.schedule = store, schedule

    def due(self, run: Run) -> bool:
        """After the warm-up epochs, then every ``every`` epochs, never after the last epoch."""
        s = self.schedule
        if run.epoch < s.warmup_epochs or run.last_epoch:
            return False
        return (run.epoch - s.warmup_epochs) % max(1, s.every) == 0

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        if self.due(run):
            record["box_mean_area"] = self.localise(run)

    def localise(self, run: Run) -> float:
        """Refresh every image's box from the online backbone's heatmap (all ranks); returns the mean box area."""
        from contrastlab import assemble
        from contrastlab.data.device_loader import DeviceEvalLoader
        from contrastlab.views import eval_view_dataset
        from contrastlab.views.localiser import last_feature_map, localise

        cfg, s, base = run.config, self.schedule, run.train_dataset
        mean, std = assemble.normalization(cfg)
        images = eval_view_dataset(base, assemble.image_size(cfg), mean, std, crop_fraction=None)
        batch = evaluation_batch_size(run)
        if run.device_views is not None:  # this rank's share, rendered on the device (from the store if held)
            shard = Subset(images, range(run.rank, len(images), run.world_size))
            held = getattr(run.device_views, "store", None)
            images = DeviceEvalLoader(shard, run.device, batch, held, workers=cfg.data.workers)
        boxes = localise(last_feature_map(run.method.backbone), images, s.threshold, run.device, kind=s.heatmap,
                         num_samples=len(base), batch_size=batch, num_workers=cfg.data.workers, edges=s.edges)
        self.store.fill(boxes)
        self.store.set_enabled(True)
        area = self.store.mean_area()
        run.log(f"epoch {run.epoch}: localised {len(boxes)} boxes (threshold {s.threshold}, {s.heatmap}); "
                f"mean box area {area:.3f} of the image")
        return area

    def state_dict(self) -> dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state)


def _needs_localiser(run: Run) -> str | None:
    if box_law(run) is None:
        return None
    return (f"views.planner={run.config.views.planner} samples crops around per-image boxes that only the localiser "
            "observer refreshes")


@register_observer("localiser", required_when=_needs_localiser)
def localiser_observer(run: Run) -> Localiser | None:
    """``localiser``: when the training crop law keeps a box store (ContrastiveCrop, SemanticCrop), else None."""
    law = box_law(run)
    return None if law is None else Localiser(*law)


def _box_table_of_version_1(ckpt: dict[str, Any]) -> None:
    """Checkpoints of version 1 kept the box table at the top level (``box_store``); it is this observer's state."""
    if "box_store" in ckpt:
        ckpt.setdefault("observers", {}).setdefault("localiser", ckpt.pop("box_store"))


UPGRADES.append(_box_table_of_version_1)
