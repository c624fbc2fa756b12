"""Test helper: ``contrastlab`` with one more backbone, ``bn_free_test``, for the multi-node tests.

``torchrun ... tests/multinode_worker.py train demo model.arch=bn_free_test ...`` runs the command line as
``-m contrastlab`` does, after registering a small convolutional backbone without BatchNorm. Without batch
statistics every sample's features are independent of how a global batch is split over ranks, so a run on two
nodes can be compared with a single process on the same global batches (BatchNorm would need SyncBatchNorm,
which has no CPU implementation).
"""

from __future__ import annotations

import os
import signal
import sys

from torch import nn

import contrastlab

FEATURES = 16


def bn_free_backbone(cifar_stem: bool = False, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """Two strided 3x3 convolutions with ReLU, global average pooling: ``[B, 3, H, W] -> [B, 16]``."""
    del cifar_stem, zero_init_residual  # nothing to change in so small a network
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, FEATURES, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, FEATURES


if "bn_free_test" not in contrastlab.BACKBONES:  # the test module imports this file too
    contrastlab.register_backbone("bn_free_test", bn_free_backbone, small_input=True)


def die_after_first_partial_checkpoint() -> None:
    """Make this process SIGKILL itself right after it writes its first mid-epoch checkpoint, in the first attempt
    of a torchrun job only: a node's worker killed at a known point of the run (only rank 0 writes checkpoints)."""
    from contrastlab.engine import trainer

    save = trainer.atomic_save

    def save_then_die(obj, path):
        save(obj, path)
        if obj.get("partial"):
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.atomic_save = save_then_die


if __name__ == "__main__":
    from contrastlab.cli import main

    if os.environ.get("CONTRASTLAB_TEST_KILL") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        die_after_first_partial_checkpoint()
    raise SystemExit(main(sys.argv[1:]))
