"""Training throughput fed three ways, side by side: ``contrastlab bench`` (see :mod:`contrastlab.bench`).

Usage (the issue's settings on a GPU machine; symmetric MoCo v2, ResNet-18 CIFAR stem, batch 512, bf16):

    python benchmarks/throughput.py cifar10/mocov2_r18_500ep method.symmetric=true train.precision=bf16 \\
        model.channels_last=true --workers 16 --out runs/bench/cifar.json
    python benchmarks/throughput.py imagenet/mocov3_r50_100ep data.batch_size=128 train.precision=bf16 \\
        --shape imagenet --jpeg --out runs/bench/imagenet_jpeg.json
"""

import sys

from contrastlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
