"""A dataset of your own: images and labels in NumPy ``.npz`` files, one file per split.

``<data.root>/<split>.npz`` holds ``images`` (uint8 ``[N, H, W, 3]``, or ``[N, H, W]`` grayscale) and ``labels``
(int ``[N]``). Register the class with ``contrastlab.register_dataset``, giving the per-channel mean and std of the
training images and their side, and select it with ``data.name=npz_images data.root=DIR``. As an array dataset it
is held on the device by the GPU input pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import contrastlab


@contrastlab.register_dataset("npz_images", normalization=((0.286, 0.286, 0.286), (0.353, 0.353, 0.353)),
                              native_size=28)
class NpzImages(contrastlab.ArrayDataset):
    name = "npz_images"

    def __init__(self, root, split: str = "train") -> None:
        path = Path(root or ".") / f"{split}.npz"
        if not path.is_file():
            raise contrastlab.DatasetError(f"{path} does not exist: npz_images reads <data.root>/<split>.npz with "
                                           "arrays 'images' (uint8 [N, H, W, 3]) and 'labels' (int [N])")
        with np.load(path) as arrays:
            images, labels = arrays["images"], arrays["labels"]
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
            raise contrastlab.DatasetError(f"{path}: expected uint8 images [N, H, W, 3] and N labels, got "
                                           f"{images.dtype} {images.shape} and {len(labels)} labels")
        self.split, self.data = split, images
        self.targets = [int(label) for label in labels]
        self.classes = [str(c) for c in range(max(self.targets) + 1)]
