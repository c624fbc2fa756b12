"""Objectives: standalone losses, one per module, each usable without the engine."""

from contrastlab.objectives.barlow_twins import BarlowTwinsLoss, cross_correlation
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
from contrastlab.objectives.swav import SwAVLoss, sinkhorn_knopp, swapped_prediction_loss
from contrastlab.objectives.vicreg import VICRegLoss

__all__ = [
    "BYOLLoss",
    "BarlowTwinsLoss",
    "DINOLoss",
    "DistillationTerms",
    "FeatureTransform",
    "InfoNCELoss",
    "MutualContrastLoss",
    "MutualTerms",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "SwAVLoss",
    "VICRegLoss",
    "build_feature_transform",
    "cross_correlation",
    "in_batch_masks",
    "kl_mimicry",
    "logit_distillation",
    "memory_bank_mutual_loss",
    "moco_mutual_loss",
    "sinkhorn_knopp",
    "supcon_operator",
    "swapped_prediction_loss",
    "teacher_temperature",
]
