"""Per-dataset normalisation constants and native image sizes.

``NORMALIZATION[name]`` is ``(mean, std)`` per RGB channel on the 0..1 scale; ``NATIVE_SIZE[name]``
is the side length of the dataset's images (the usual training resolution for ``imagefolder``).
"""

from __future__ import annotations

Triple = tuple[float, float, float]

# Fashion-MNIST: computed once over every pixel of the official train split
# (train-images-idx3-ubyte.gz, 60,000 x 28 x 28, values / 255): mean 0.286041, std 0.353024
# (population std over all pixels). Grayscale is repeated to RGB, so all three channels share them.
# The demo subset uses the same constants so that models move between the two unchanged.
_FASHION_MNIST: tuple[Triple, Triple] = ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530))

# The other sets are not on this machine; their values are the widely published per-channel
# statistics of each set's training images (std over all pixels, not the mean of per-image stds).
NORMALIZATION: dict[str, tuple[Triple, Triple]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "fashion_mnist": _FASHION_MNIST,
    "demo": _FASHION_MNIST,
}

NATIVE_SIZE: dict[str, int] = {
    "cifar10": 32,
    "cifar100": 32,
    "stl10": 96,
    "tiny_imagenet": 64,
    "imagefolder": 224,
    "fashion_mnist": 28,
    "demo": 28,
}
