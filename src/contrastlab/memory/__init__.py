"""Memories: embeddings that outlive a step (MoCo's queue, CaCo's learnable memory, MCL's sample banks)."""

from contrastlab.memory.learnable import LearnableMemory, memory_gradient
from contrastlab.memory.queue import FeatureQueue
from contrastlab.memory.sample_bank import SampleMemoryBank, sample_contrast_indices

__all__ = [
    "FeatureQueue",
    "LearnableMemory",
    "SampleMemoryBank",
    "memory_gradient",
    "sample_contrast_indices",
]
