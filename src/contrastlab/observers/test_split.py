"""The monitors' test split: one loader of evaluation views per run, shared by the kNN and test-accuracy monitors
(one pass definition; on the device, one copy of the test images).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from contrastlab.observers.base import Run, evaluation_batch_size


def evaluate_on_device(run: Run, test: Dataset) -> bool:
    """Whether the monitors render their evaluation views on the device: when the training views are made there
    and the test split can be held there too (its size known without decoding) or is image files."""
    from contrastlab.data.device_images import image_shape

    pipeline = run.input_pipeline
    return pipeline == "gpu-files" or (pipeline == "gpu-resident" and image_shape(test) is not None)


def test_loader(run: Run) -> Any:
    """In-order batches ``(views, labels, index)`` of one evaluation view per test image (``monitor.max_test`` of
    them at most, a fixed random subset), built on first use and kept in ``run.shared``."""
    if "test_loader" not in run.shared:
        from contrastlab import assemble
        from contrastlab.data.device_loader import evaluation_loader
        from contrastlab.observers.knn_monitor import fixed_subset

        cfg, test = run.config, run.test_dataset
        views = fixed_subset(assemble.evaluation_views(cfg, test), cfg.monitor.max_test, 1)
        run.shared["test_loader"] = evaluation_loader(views, batch_size=evaluation_batch_size(run),
                                                      workers=cfg.data.workers, device=run.device,
                                                      on_device=evaluate_on_device(run, test))
    return run.shared["test_loader"]
