"""Vision Transformers as MoCo v3 builds them (Chen, Xie, He, "An Empirical Study of Training Self-Supervised
Vision Transformers", ICCV 2021), on timm's ``VisionTransformer`` (Dosovitskiy et al. 2021).

Differences from timm's defaults, all from MoCo v3 (section 4 and its released ``vits.py``):

- a **fixed 2-D sin-cos position embedding** (not learned): the patch in row ``r`` and column ``c`` gets
  ``[sin(r * omega), cos(r * omega), sin(c * omega), cos(c * omega)]`` with ``omega_d = 10000^(-d / (D/4))``,
  ``d = 0 .. D/4 - 1`` (each block ``D/4`` wide), and the class token a zero vector. This is the tensor of
  upstream's ``build_2d_sincos_position_embedding`` (:func:`sincos_position_embedding`), row terms first, so an
  embedding regenerated here (another resolution, a checkpoint without ``pos_embed``) is the one an
  upstream-trained model saw;
- **initialisation**: Xavier-uniform Linears, with the fused ``qkv`` weight treated as three separate
  ``D x D`` matrices (bound ``sqrt(6 / (D + D))``); zero biases; class token ``N(0, 1e-6)``; the patch
  projection Xavier-uniform over its flattened ``3 * 16 * 16`` fan-in;
- ``stop_grad_conv1``: a frozen random patch projection (section 4.2, "random patch projection");
- ViT-S uses **12 heads** (timm's ViT-S has 6), ViT-S/B: depth 12, MLP ratio 4, LayerNorm eps 1e-6;
- the **conv-stem** variants (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
  four 3x3 stride-2 Conv-BN-ReLU (widths ``D/8, D/4, D/2, D``) and a 1x1 conv replace the 16x16 patch
  projection, and one transformer block is removed (depth 11) to keep the compute equal.

The classifier head is ``nn.Identity``: the backbone returns the final-normalised class token ``[B, D]``.
Weights of ``vit_small`` / ``vit_base`` load with strict key matching into timm's
``vit_small_patch16_224`` / ``vit_base_patch16_224`` built with ``num_classes=0`` (the head count does
not change any weight shape). timm is an optional dependency: ``pip install "contrastlab[vit]"``.

**DINO's ViTs** (``vit_tiny_dino``, ``vit_small_dino``, ``vit_base_dino``; Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, ``vision_transformer.py`` of github.com/facebookresearch/dino) are the standard ViT-Ti/16
(192 wide, 3 heads), ViT-S/16 (6 heads) and ViT-B/16 (12 heads) with a **learned** position embedding, built by :func:`build_vit` with
``style="dino"`` in :data:`VIT_ARCHS`:

- they take any input side (multi-crop's 96-pixel local crops beside the 224-pixel global ones): the patch grid's
  position embedding is resized bicubically as upstream's ``interpolate_pos_encoding`` does it
  (:func:`interpolate_position_embedding`);
- initialisation as upstream: truncated normal (std 0.02) Linear weights, position embedding and class token, zero
  biases, LayerNorms at 1 and 0, PyTorch's default for the patch projection;
- their keys are upstream's and timm's ``vit_{tiny,small,base}_patch16_224`` (which have DINO's head counts), so
  released DINO backbones load strictly.
"""

from __future__ import annotations

import math
from functools import cache, partial
from typing import Any

import torch
from torch import nn

from contrastlab.errors import ConfigError

__all__ = ["VIT_ARCHS", "ConvStem", "build_vit", "interpolate_position_embedding", "sincos_position_embedding"]

VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 12, "conv_stem": False, "style": "mocov3"},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "conv_stem": False, "style": "mocov3"},
    "vit_conv_small": {"embed_dim": 384, "depth": 11, "num_heads": 12, "conv_stem": True, "style": "mocov3"},
    "vit_conv_base": {"embed_dim": 768, "depth": 11, "num_heads": 12, "conv_stem": True, "style": "mocov3"},
    "vit_tiny_dino": {"embed_dim": 192, "depth": 12, "num_heads": 3, "conv_stem": False, "style": "dino"},
    "vit_small_dino": {"embed_dim": 384, "depth": 12, "num_heads": 6, "conv_stem": False, "style": "dino"},
    "vit_base_dino": {"embed_dim": 768, "depth": 12, "num_heads": 12, "conv_stem": False, "style": "dino"},
}
"""MoCo v3's four ViTs and DINO's three (``style``), patch size 16."""

TIMM_EQUIVALENT = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224",
                   "vit_tiny_dino": "vit_tiny_patch16_224", "vit_small_dino": "vit_small_patch16_224",
                   "vit_base_dino": "vit_base_patch16_224"}
"""The timm model whose weights have the same keys and shapes (``contrastlab export --format timm``)."""


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos embedding ``[1, 1 + grid_h * grid_w, dim]``, row 0 (class token) zero.

    Token ``1 + k`` belongs to patch ``k`` in timm's row-major order (``k = r * grid_w + c``). As upstream's
    ``build_2d_sincos_position_embedding`` (``torch.meshgrid(grid_w, grid_h)``, "ij" indexing), patch ``k``
    gets ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` with ``a = k // grid_h`` and ``b = k % grid_h``: on a
    square grid (every ViT built here) ``a`` is the patch's row ``r`` and ``b`` its column ``c``. On a
    non-square grid upstream's ``a, b`` are not the row and column; the same tensor is returned, so that it
    stays upstream's.

    Args:
        grid_h: patches per column (image height / patch size).
        grid_w: patches per row.
        dim: embedding width, divisible by 4.
        temperature: the frequency base (10000).

    Example:
        >>> pe = sincos_position_embedding(2, 2, 4)  # omega = 1: [sin r, cos r, sin c, cos c]
        >>> [round(v, 4) for v in pe[0, 1 + 1 * 2 + 0].tolist()]  # row 1, column 0
        [0.8415, 0.5403, 0.0, 1.0]
    """
    if dim % 4:
        raise ConfigError(f"a 2-D sin-cos position embedding needs an embedding width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    patch = torch.arange(grid_h * grid_w, dtype=torch.int64)
    first = torch.div(patch, grid_h, rounding_mode="floor").to(torch.float64).reshape(-1, 1) * omega
    second = (patch % grid_h).to(torch.float64).reshape(-1, 1) * omega
    patches = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).unsqueeze(0).float()


class ConvStem(nn.Module):
    """Convolutional patch embedding: 4 x (3x3/2 conv, BN, ReLU) then a 1x1 conv to ``embed_dim``.

    Accepts (and ignores) the extra keyword arguments timm passes to its patch-embedding layer.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, **_: Any) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 16:
            raise ConfigError(f"the conv stem downsamples by 16 (four stride-2 convs), got patch size {patch}")
        if embed_dim % 8:
            raise ConfigError(f"the conv stem needs an embedding width divisible by 8, got {embed_dim}")
        self.img_size = size
        self.patch_size = (16, 16)
        self.grid_size = (size[0] // 16, size[1] // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width_out = in_chans, embed_dim // 8
        for _ in range(4):
            layers += [nn.Conv2d(width_in, width_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width_out), nn.ReLU(inplace=True)]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return 16 if as_scalar else (16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"the conv stem was built for {self.img_size} inputs, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


def _xavier_qkv_(linear: nn.Linear) -> None:
    """Xavier-uniform of the fused ``[3D, D]`` qkv weight as three ``[D, D]`` matrices (MoCo v3)."""
    bound = math.sqrt(6.0 / float(linear.weight.shape[0] // 3 + linear.weight.shape[1]))
    nn.init.uniform_(linear.weight, -bound, bound)


def interpolate_position_embedding(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """A learned position embedding ``[1, 1 + N, D]`` (class token first, a square grid of ``N`` patches) for a
    ``grid_h x grid_w`` patch grid, as DINO's ``interpolate_pos_encoding`` (facebookresearch/dino
    ``vision_transformer.py``) computes it.

    The grid is resized bicubically (``align_corners=False``) with the *scale factors* ``(grid + 0.1) / sqrt(N)``
    per side (upstream's 0.1 keeps the floor of the output size right); the class token's row is kept. The
    embedding is returned unchanged when the grid is the one it was built for.

    Example:
        >>> pe = torch.randn(1, 1 + 14 * 14, 8)
        >>> interpolate_position_embedding(pe, 6, 6).shape  # a 96-pixel crop, 16-pixel patches
        torch.Size([1, 37, 8])
    """
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the position embedding's {patches} patches are not a square grid")
    if grid_h == side and grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
                                     mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):  # cannot happen for grids up to thousands of patches a side
        raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, wanted {(grid_h, grid_w)}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)], dim=1)


@cache
def _dino_vit_class() -> type:
    """timm's ``VisionTransformer`` with DINO's position-embedding interpolation (built on first use: timm is
    optional and slow to import)."""
    from timm.models.vision_transformer import VisionTransformer

    class DINOVisionTransformer(VisionTransformer):
        """A ViT that takes any input side: its learned position embedding is resized to the patch grid as DINO does
        (:func:`interpolate_position_embedding`). Built with ``dynamic_img_size=True``, so the patch embedding
        returns ``[B, H, W, D]`` grids."""

        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, d = x.shape
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
            return self.pos_drop(tokens + interpolate_position_embedding(self.pos_embed, h, w))

    DINOVisionTransformer.__module__ = __name__
    return DINOVisionTransformer


def _init_dino_(vit: nn.Module) -> None:
    """DINO's initialisation (``VisionTransformer._init_weights`` upstream): truncated normal (std 0.02, cut at
    +-2) Linear weights, position embedding and class token; zero biases; LayerNorm 1 and 0; the patch projection
    keeps PyTorch's default initialisation."""
    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    vit.patch_embed.proj.reset_parameters()


def build_vit(name: str, img_size: int = 224, stop_grad_conv1: bool = False,
              drop_path_rate: float = 0.0) -> tuple[nn.Module, int]:
    """One of :data:`VIT_ARCHS`: MoCo v3's (fixed sin-cos position embedding, MoCo v3's initialisation) or DINO's
    (learned, interpolated position embedding, DINO's initialisation).

    Args:
        name: ``vit_small``, ``vit_base``, ``vit_conv_small``, ``vit_conv_base`` (MoCo v3) or ``vit_tiny_dino``,
            ``vit_small_dino``, ``vit_base_dino`` (DINO).
        img_size: input side (a multiple of 16); the position embedding has ``(img_size / 16)^2`` patches. DINO's
            ViTs also take other sides (their embedding is interpolated); MoCo v3's take this one only.
        stop_grad_conv1: freeze the random patch projection (not applicable to the conv stems, whose
            convolutions always train, as upstream).
        drop_path_rate: stochastic depth (Huang et al. 2016), timm's ``drop_path_rate``: the rate rises linearly
            from 0 in the first block to this value in the last. 0 for MoCo v3's pre-training; DINO's student 0.1;
            DeiT fine-tunes with 0.1.

    Returns:
        ``(vit, embed_dim)``; ``vit`` maps ``[B, 3, img_size, img_size]`` to the class token ``[B, embed_dim]``.
    """
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        raise ConfigError(f"backbone {name!r} needs timm: pip install 'contrastlab[vit]' (or pip install timm)") from exc
    if name not in VIT_ARCHS:
        raise ConfigError(f"unknown ViT {name!r}; valid: {', '.join(VIT_ARCHS)}")
    if img_size < 16 or img_size % 16:
        raise ConfigError(f"a ViT with 16x16 patches needs data.image_size a positive multiple of 16, got {img_size}")
    spec = VIT_ARCHS[name]
    common: dict[str, Any] = {"img_size": img_size, "patch_size": 16, "num_classes": 0, "embed_dim": spec["embed_dim"],
                              "depth": spec["depth"], "num_heads": spec["num_heads"], "mlp_ratio": 4.0,
                              "qkv_bias": True, "norm_layer": partial(nn.LayerNorm, eps=1e-6),
                              "drop_path_rate": drop_path_rate}
    if spec["style"] == "dino":
        vit = _dino_vit_class()(dynamic_img_size=True, weight_init="skip", **common)  # initialised below
        _init_dino_(vit)
        if stop_grad_conv1:
            vit.patch_embed.proj.weight.requires_grad_(False)
            vit.patch_embed.proj.bias.requires_grad_(False)
        return vit, spec["embed_dim"]
    kwargs: dict[str, Any] = {"embed_layer": ConvStem} if spec["conv_stem"] else {}
    vit = VisionTransformer(**common, **kwargs)
    grid_h, grid_w = vit.patch_embed.grid_size
    vit.pos_embed = nn.Parameter(sincos_position_embedding(grid_h, grid_w, spec["embed_dim"]), requires_grad=False)
    for module_name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in module_name:
                _xavier_qkv_(module)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    if not spec["conv_stem"]:
        proj = vit.patch_embed.proj
        bound = math.sqrt(6.0 / float(3 * 16 * 16 + spec["embed_dim"]))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
        if stop_grad_conv1:
            proj.weight.requires_grad_(False)
            proj.bias.requires_grad_(False)
    elif stop_grad_conv1:
        raise ConfigError(f"{name} has a convolutional stem; stop_grad_conv1 (a frozen random patch projection) "
                          "applies to the patch-projection ViTs vit_small / vit_base only")
    return vit, spec["embed_dim"]
