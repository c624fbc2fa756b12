"""Observers: what watches a run through the trainer's callbacks (:mod:`contrastlab.observers.base`).

Registered by name in :data:`~contrastlab.registry.OBSERVERS` for the config list ``observers``:

- ``progress``: the console progress line (:mod:`~contrastlab.observers.progress`);
- ``knn``: the kNN monitor and its collapse guard (:mod:`~contrastlab.observers.knn_monitor`);
- ``test_accuracy``: test-set top-1 of a method's classifiers (:mod:`~contrastlab.observers.classification_monitor`);
- ``localiser``: ContrastiveCrop's box refresh on its schedule (:mod:`~contrastlab.observers.localisation`);
- ``plots``: training-curve PNGs (:mod:`~contrastlab.observers.training_curves`);
- ``score_statistics``: FT's positive/negative score statistics (:mod:`~contrastlab.observers.score_statistics`).

Loggers (``log.to``) live in :mod:`contrastlab.observers.loggers`.
"""

from contrastlab.observers import (
    classification_monitor,
    knn_monitor,
    localisation,
    progress,
    score_statistics,
    training_curves,
)
from contrastlab.observers.base import Observer, ObserverList, Run

__all__ = ["Observer", "ObserverList", "Run", "classification_monitor", "knn_monitor", "localisation", "progress",
           "score_statistics", "training_curves"]
