"""Memories: stores of embeddings that outlive a step (MoCo's queue)."""

from contrastlab.memory.queue import FeatureQueue

__all__ = ["FeatureQueue"]
