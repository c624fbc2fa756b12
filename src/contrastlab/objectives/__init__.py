"""Objectives: standalone losses, one per module, each usable without the engine."""

from contrastlab.objectives.cosine import BYOLLoss, NegativeCosineSimilarity
from contrastlab.objectives.info_nce import InfoNCELoss
from contrastlab.objectives.nt_xent import NTXentLoss

__all__ = ["BYOLLoss", "InfoNCELoss", "NTXentLoss", "NegativeCosineSimilarity"]
