"""Objectives: standalone losses, one per module, each usable without the engine."""

from contrastlab.objectives.cosine import BYOLLoss, NegativeCosineSimilarity
from contrastlab.objectives.dino import DINOLoss, teacher_temperature
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform
from contrastlab.objectives.info_nce import InfoNCELoss
from contrastlab.objectives.mutual import (
    DistillationTerms,
    MutualContrastLoss,
    MutualTerms,
    in_batch_masks,
    kl_mimicry,
    logit_distillation,
    memory_bank_mutual_loss,
    moco_mutual_loss,
    supcon_operator,
)
from contrastlab.objectives.nt_xent import NTXentLoss

__all__ = [
    "BYOLLoss",
    "DINOLoss",
    "DistillationTerms",
    "FeatureTransform",
    "InfoNCELoss",
    "MutualContrastLoss",
    "MutualTerms",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "build_feature_transform",
    "in_batch_masks",
    "kl_mimicry",
    "logit_distillation",
    "memory_bank_mutual_loss",
    "moco_mutual_loss",
    "supcon_operator",
    "teacher_temperature",
]
