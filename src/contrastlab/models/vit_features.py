"""Linear-probe features of a Vision Transformer read from its last blocks.

DINO (Caron et al., ICCV 2021, Section 4.1 and facebookresearch/dino ``eval_linear.py``) trains its linear probe of
ViT-S/16 on the class tokens of the last four blocks, each passed through the final LayerNorm and concatenated
(``--n_last_blocks 4``), and of ViT-B/16 on the last block's class token next to the mean of its patch tokens
(``--n_last_blocks 1 --avgpool_patchtokens true``). The release interleaves those two ``D``-vectors feature by
feature (``cat((cls[..., None], mean[..., None]), -1).reshape(B, -1)``); the same order is kept here so that a
released linear classifier reads the features it was trained on. The release cannot combine the mean patch token
with several blocks (its concatenation fails), and neither does this module.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastlab.errors import ConfigError


class LastBlocksFeatures(nn.Module):
    """``[B, 3, H, W] -> [B, dim]``: the class tokens of the ViT's last ``n_last_blocks`` blocks (final-normalised,
    concatenated, the earliest block first), or with ``avgpool_patch_tokens`` the last class token interleaved with
    the mean patch token.

    Args:
        vit: a timm ``VisionTransformer`` (as :func:`contrastlab.models.vit.build_vit` returns).
        n_last_blocks: how many of the last blocks to read (DINO: 4 for ViT-S, 1 for ViT-B).
        avgpool_patch_tokens: add the mean of the last block's patch tokens (DINO's ViT-B probe); needs
            ``n_last_blocks == 1``.

    Attributes:
        dim: the feature dimension, ``embed_dim * (n_last_blocks + avgpool_patch_tokens)``.
    """

    def __init__(self, vit: nn.Module, n_last_blocks: int = 4, avgpool_patch_tokens: bool = False) -> None:
        super().__init__()
        blocks = getattr(vit, "blocks", None)
        if blocks is None or not hasattr(vit, "embed_dim"):
            raise ConfigError(f"linear.n_last_blocks / linear.avgpool_patch_tokens read a ViT's blocks; this backbone "
                              f"is a {type(vit).__name__}: set linear.n_last_blocks=1 linear.avgpool_patch_tokens=false")
        if not 1 <= n_last_blocks <= len(blocks):
            raise ConfigError(f"linear.n_last_blocks must be between 1 and the ViT's {len(blocks)} blocks, "
                              f"got {n_last_blocks}")
        if avgpool_patch_tokens and n_last_blocks != 1:
            raise ConfigError("linear.avgpool_patch_tokens=true reads the last block only (DINO's ViT-B probe): "
                              f"set linear.n_last_blocks=1, got {n_last_blocks}")
        self.vit = vit
        self.n_last_blocks = n_last_blocks
        self.avgpool_patch_tokens = avgpool_patch_tokens
        self.dim = vit.embed_dim * (n_last_blocks + int(avgpool_patch_tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))  # as forward_features
        first = len(vit.blocks) - self.n_last_blocks
        normed = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i >= first:
                normed.append(vit.norm(x))
        cls = torch.cat([tokens[:, 0] for tokens in normed], dim=-1)
        if not self.avgpool_patch_tokens:
            return cls
        patches = normed[-1][:, vit.num_prefix_tokens:].mean(dim=1)
        return torch.stack([cls, patches], dim=-1).flatten(1)  # cls_0, mean_0, cls_1, mean_1, ...


def probe_feature_dim(feature_dim: int, linear) -> int:
    """The width of the features a linear probe with ``linear`` settings (:class:`contrastlab.config.schema.LinearConfig`)
    reads from a backbone of ``feature_dim`` outputs (a ViT's ``embed_dim``)."""
    return feature_dim * (linear.n_last_blocks + int(linear.avgpool_patch_tokens))
