"""contrastlab: contrastive self-supervised learning of visual representations."""

__version__ = "0.1.0"
