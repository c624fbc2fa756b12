"""Per-view photometric recipes: colour, blur and solarisation, then flip and normalisation.

A recipe is applied to a view after its box has been cropped and resized. It takes that PIL image and
returns a normalised float tensor ``[3, S, S]``. Stages run in a fixed order, each with its own probability:

1. colour jitter (brightness, contrast, saturation, hue in a random order),
2. grayscale (before the jitter with ``grayscale_first``, MoCo v1's order),
3. Gaussian blur, kernel ``~blur_kernel_fraction`` of the image side (odd), sigma uniform in ``blur_sigma``,
4. solarisation (pixels ``>= solarize_threshold`` inverted),
5. horizontal flip,
6. ``to_tensor`` and ``Normalize(mean, std)``.

The pixel operations are torchvision's v1 functional ops (``torchvision.transforms.functional``) on PIL
images; the composition and its random draws are ours. A stage whose probability is 0 is absent and draws
nothing; a present stage draws exactly what the matching v1 transform (``RandomApply([ColorJitter])``,
``RandomGrayscale``, ``RandomApply([GaussianBlur])``, ``RandomSolarize``, ``RandomHorizontalFlip``) draws,
in the same order, so a recipe reproduces the equivalent torchvision ``Compose`` under the same seed.

Recipes (``PHOTOMETRICS``):

- ``"simclr"``: SimCLR (Chen et al. 2020): jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2,
  blur sigma in [0.1, 2.0] p=0.5.
- ``"mocov2"``: MoCo v2 (Chen et al. 2020), which adopted SimCLR's recipe: the same settings. (MoCo v2
  blurred with PIL's unbounded-radius filter; here both use the SimCLR kernel of ~10% of the side.)
- ``"mocov1"``: MoCo v1 (He et al. 2020; also MCL's MoCo runs): grayscale 0.2, then jitter
  (0.4, 0.4, 0.4, 0.4) always, no blur. torchvision's ``ColorJitter`` without ``RandomApply`` draws no coin;
  here the always-applied jitter still draws one, so the random streams (not the distribution) differ.
- ``"byol"``: BYOL (Grill et al. 2020), also MoCo v3; asymmetric: jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale 0.2; view 0 blur p=1.0, no solarisation; views >= 1 blur p=0.1, solarisation p=0.2.
- ``"swav"``: SwAV (Caron et al. 2020; facebookresearch/swav ``src/multicropdataset.py``), every crop alike:
  jitter (0.8, 0.8, 0.8, 0.2) p=0.8 (SimCLR's strength 1), grayscale 0.2, blur sigma in [0.1, 2.0] p=0.5 (PIL's
  radius upstream; the ~10% kernel here). Also solo-learn's ``symmetric.yaml`` CIFAR augmentation.
- ``"dino"``: DINO (Caron et al. 2021, ``DataAugmentationDINO`` in facebookresearch/dino ``main_dino.py``): BYOL's
  jitter and grayscale on every view; view 0 blur p=1.0; view 1 blur p=0.1 and solarisation p=0.2; views >= 2
  (multi-crop's local crops) blur p=0.5, no solarisation.
- ``"small"``: the SimCLR recipe without blur, the usual choice for CIFAR-sized images.
- ``"byol_small"``: the BYOL recipe without blur (view 0 no solarisation, views >= 1 solarisation p=0.2), as
  solo-learn's CIFAR ``asymmetric.yaml`` (vturrisi/solo-learn, ``scripts/pretrain/cifar/augmentations``).
- ``"vicreg_cifar"``: solo-learn's VICReg on CIFAR (vturrisi/solo-learn ``scripts/pretrain/cifar/vicreg.yaml``),
  the same for both views: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, no blur, solarisation p=0.1.
- ``"none"``: flip and normalisation only.
- ``"eval"``: normalisation only.

Example:
    >>> recipe = make_photometric("byol", view=1, mean=(0.5,) * 3, std=(0.25,) * 3, solarize_prob=0.0)
    >>> recipe.blur_prob
    0.1
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
from PIL import Image

from contrastlab.errors import ConfigError
from contrastlab.registry import PHOTOMETRICS as _PHOTOMETRICS
from contrastlab.registry import register_photometric

Triple = tuple[float, float, float]


def _coin(generator: torch.Generator | None) -> torch.Tensor:
    """One uniform draw in [0, 1), as the float32 tensor torchvision's random transforms compare against."""
    return torch.rand(1, generator=generator)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _jitter_ranges(
    jitter: tuple[float, float, float, float],
) -> tuple[tuple[float, float] | None, ...]:
    """Factor ranges of brightness, contrast, saturation, hue, as ColorJitter derives them (None = off)."""
    ranges: list[tuple[float, float] | None] = []
    for strength in jitter[:3]:
        ranges.append(None if strength == 0 else (max(0.0, 1.0 - strength), 1.0 + strength))
    hue = jitter[3]
    ranges.append(None if hue == 0 else (-hue, hue))
    return tuple(ranges)


def blur_kernel_size(side: int, fraction: float = 0.1) -> int:
    """Odd Gaussian kernel size of about ``fraction`` of ``side`` (SimCLR, Chen et al. 2020); at least 3."""
    radius = int(fraction * side) // 2
    return max(3, 2 * radius + 1)


@dataclass(frozen=True)
class PhotometricRecipe:
    """One view's photometric augmentation, callable on a PIL image (see the module docstring).

    Args:
        mean: Per-channel normalisation mean (RGB, on the [0, 1] scale).
        std: Per-channel normalisation standard deviation.
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue).
        jitter_prob: Probability of applying colour jitter.
        grayscale_prob: Probability of converting to (3-channel) grayscale.
        blur_prob: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's sigma, drawn uniformly.
        blur_kernel_fraction: Kernel size as a fraction of the image's shorter side (made odd, >= 3).
        solarize_prob: Probability of solarising.
        solarize_threshold: Pixels ``>=`` this value (0..255) are inverted.
        flip_prob: Probability of a horizontal flip.
        grayscale_first: Run the grayscale stage before colour jitter (MoCo v1's order).
    """

    mean: Triple
    std: Triple
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    solarize_prob: float = 0.0
    solarize_threshold: int = 128
    flip_prob: float = 0.5
    grayscale_first: bool = False

    def __post_init__(self) -> None:
        def as_floats(name: str, n: int) -> tuple[float, ...]:
            value = getattr(self, name)
            try:
                floats = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{name} must be {n} numbers, got {value!r}") from exc
            if len(floats) != n or not all(math.isfinite(v) for v in floats):
                raise ConfigError(f"{name} must be {n} finite numbers, got {value!r}")
            object.__setattr__(self, name, floats)
            return floats

        as_floats("mean", 3)
        if any(s <= 0 for s in as_floats("std", 3)):
            raise ConfigError(f"std must be positive, got {self.std!r}")
        jitter = as_floats("jitter", 4)
        if any(j < 0 for j in jitter) or jitter[3] > 0.5:
            raise ConfigError(f"jitter strengths must be >= 0 with hue <= 0.5, got {jitter!r}")
        sigma = as_floats("blur_sigma", 2)
        if not 0 < sigma[0] <= sigma[1]:
            raise ConfigError(f"blur_sigma must satisfy 0 < min <= max, got {sigma!r}")
        for name in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "flip_prob"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}")
            object.__setattr__(self, name, p)
        if not 0.0 < float(self.blur_kernel_fraction) <= 1.0:
            raise ConfigError(f"blur_kernel_fraction must be in (0, 1], got {self.blur_kernel_fraction!r}")
        if not 0 <= int(self.solarize_threshold) <= 256:
            raise ConfigError(f"solarize_threshold must be in [0, 256], got {self.solarize_threshold!r}")
        object.__setattr__(self, "solarize_threshold", int(self.solarize_threshold))

    def _color_jitter(self, img: Image.Image, generator: torch.Generator | None) -> Image.Image:
        ranges = _jitter_ranges(self.jitter)  # type: ignore[arg-type]
        order = torch.randperm(4, generator=generator)
        factors = [None if r is None else _uniform(r[0], r[1], generator) for r in ranges]
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for fn_id in order.tolist():
            if factors[fn_id] is not None:
                img = adjust[fn_id](img, factors[fn_id])
        return img

    def _grayscale(self, img: Image.Image, generator: torch.Generator | None) -> Image.Image:
        if self.grayscale_prob > 0 and bool(_coin(generator) < self.grayscale_prob):
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        return img

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None,
                 blur_sigma: float | None = None) -> torch.Tensor:
        """Augment ``image`` and return a normalised float tensor ``[3, H, W]``.

        Args:
            image: The cropped and resized view, a PIL image (converted to RGB if needed).
            generator: RNG to draw from; ``None`` uses torch's global RNG.
            blur_sigma: the blur's sigma when the blur coin says blur (JointBlur draws it for the pair);
                ``None`` draws it uniformly from ``self.blur_sigma``.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"a photometric recipe takes a PIL image, got {type(image).__name__}")
        img = image if image.mode == "RGB" else image.convert("RGB")
        # RandomApply's test is "skip if p < u"; the coin is drawn only when the stage is present.
        if self.grayscale_first:
            img = self._grayscale(img, generator)
        if self.jitter_prob > 0 and any(self.jitter) and not bool(self.jitter_prob < _coin(generator)):
            img = self._color_jitter(img, generator)
        if not self.grayscale_first:
            img = self._grayscale(img, generator)
        if self.blur_prob > 0 and not bool(self.blur_prob < _coin(generator)):
            sigma = _uniform(self.blur_sigma[0], self.blur_sigma[1], generator) if blur_sigma is None else blur_sigma
            k = blur_kernel_size(min(img.size), self.blur_kernel_fraction)
            img = F.gaussian_blur(img, [k, k], [sigma, sigma])
        if self.solarize_prob > 0 and _coin(generator).item() < self.solarize_prob:
            img = F.solarize(img, self.solarize_threshold)
        if self.flip_prob > 0 and bool(_coin(generator) < self.flip_prob):
            img = F.hflip(img)
        return F.normalize(F.to_tensor(img), list(self.mean), list(self.std))


def _simclr(view: int) -> dict[str, object]:
    return {"jitter": (0.4, 0.4, 0.4, 0.1), "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.5}


def _byol(view: int) -> dict[str, object]:
    first = view == 0
    return {
        "jitter": (0.4, 0.4, 0.2, 0.1),
        "jitter_prob": 0.8,
        "grayscale_prob": 0.2,
        "blur_prob": 1.0 if first else 0.1,
        "solarize_prob": 0.0 if first else 0.2,
    }


def _dino(view: int) -> dict[str, object]:
    if view < 2:
        return _byol(view)
    return {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.5}


def _byol_small(view: int) -> dict[str, object]:
    return {**_byol(view), "blur_prob": 0.0}


def _mocov1(view: int) -> dict[str, object]:
    return {"jitter": (0.4, 0.4, 0.4, 0.4), "jitter_prob": 1.0, "grayscale_prob": 0.2, "grayscale_first": True}


def _swav(view: int) -> dict[str, object]:
    return {"jitter": (0.8, 0.8, 0.8, 0.2), "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.5}


def _small(view: int) -> dict[str, object]:
    return {"jitter": (0.4, 0.4, 0.4, 0.1), "jitter_prob": 0.8, "grayscale_prob": 0.2}


def _vicreg_cifar(view: int) -> dict[str, object]:
    return {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_prob": 0.8, "grayscale_prob": 0.2, "solarize_prob": 0.1}


def _none(view: int) -> dict[str, object]:
    return {}


def _eval(view: int) -> dict[str, object]:
    return {"flip_prob": 0.0}


for _name, _settings in {
    "simclr": _simclr,
    "mocov2": _simclr,  # MoCo v2 adopted SimCLR's jitter, grayscale and blur (sigma 0.1-2.0, p=0.5)
    "mocov1": _mocov1,
    "byol": _byol,
    "dino": _dino,
    "byol_small": _byol_small,
    "small": _small,
    "vicreg_cifar": _vicreg_cifar,
    "none": _none,
    "eval": _eval,
    "swav": _swav,
}.items():
    register_photometric(_name, _settings)

PHOTOMETRICS = _PHOTOMETRICS
"""Recipe registry (:data:`contrastlab.registry.PHOTOMETRICS`): name -> function of the view index giving that
view's :class:`PhotometricRecipe` settings. Users add theirs with :func:`contrastlab.register_photometric`."""

_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(PhotometricRecipe) if f.name not in ("mean", "std"))


def make_photometric(
    name: str, view: int, mean: Sequence[float], std: Sequence[float], **overrides: object
) -> PhotometricRecipe:
    """Build the photometric recipe ``name`` for view number ``view``.

    Args:
        name: A name of :data:`PHOTOMETRICS`.
        view: Index of the view (matters for asymmetric recipes such as ``"byol"``).
        mean: Normalisation mean (RGB, [0, 1] scale).
        std: Normalisation standard deviation.
        **overrides: Any ``PhotometricRecipe`` field except mean/std (``jitter``, ``jitter_prob``,
            ``grayscale_prob``, ``blur_prob``, ``blur_sigma``, ``blur_kernel_fraction``, ``solarize_prob``,
            ``solarize_threshold``, ``flip_prob``), plus ``jitter_strength``, a factor on the recipe's
            jitter strengths (1.0 = as published).

    Raises:
        ConfigError: If the name or an override is unknown, or a value is invalid.
    """
    PHOTOMETRICS.check(name)
    if isinstance(view, bool) or not isinstance(view, int) or view < 0:
        raise ConfigError(f"view must be a non-negative integer, got {view!r}")
    valid_keys = (*_OVERRIDABLE, "jitter_strength")
    for key in overrides:
        if key not in valid_keys:
            close = difflib.get_close_matches(key, valid_keys, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(f"unknown photometric option {key!r}{hint}; valid options: {list(valid_keys)}")
    settings = PHOTOMETRICS[name](view)
    settings.update(overrides)
    strength = settings.pop("jitter_strength", 1.0)
    jitter = settings.get("jitter", (0.0, 0.0, 0.0, 0.0))
    try:
        settings["jitter"] = tuple(float(strength) * float(j) for j in jitter)  # type: ignore[union-attr, arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"jitter_strength and jitter must be numbers, got {strength!r}, {jitter!r}"
        ) from exc
    return PhotometricRecipe(mean=tuple(mean), std=tuple(std), **settings)  # type: ignore[arg-type]
