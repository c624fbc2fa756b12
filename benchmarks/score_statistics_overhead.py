"""What Feature Transformation and the score-statistics observer cost, next to the training step they ride on.

One process, one MoCo v2 model (CIFAR ResNet-20 at half width, 32 px, projector 256-64, queue 4096, T 0.2),
timed in the same run:

- a plain training step (forward, backward, SGD step): the baseline;
- the same step with FT (the published setting);
- the observer's ``update`` on that step's outputs (host wall time; plus CUDA-event time on a GPU), and the
  time to write one epoch's file.

Usage: python benchmarks/score_statistics_overhead.py [--batch 128] [--steps 20] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from contrastlab.methods import MoCo
from contrastlab.models import build_backbone
from contrastlab.observers.score_statistics import ScoreStatistics


def _model(feature_transform: dict | None, device: torch.device) -> MoCo:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.5)
    return MoCo(net, dim, proj_hidden_dim=256, proj_out_dim=64, queue_size=4096, temperature=0.2,
                shuffle_bn=False, feature_transform=feature_transform).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(method: MoCo, views: list[torch.Tensor], steps: int, device: torch.device) -> tuple[float, dict]:
    """Median milliseconds of a training step, and the last step's outputs."""
    optimiser = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    times, outputs = [], {}
    for i in range(steps + 2):  # two warm-up steps
        _sync(device)
        start = time.perf_counter()
        out = method(views, None, None)
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        optimiser.step()
        _sync(device)
        if i >= 2:
            times.append(1000.0 * (time.perf_counter() - start))
        outputs = out.outputs
    return statistics.median(times), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, 32, 32, generator=g).to(device) for _ in range(2)]
    plain_ms, plain_out = time_steps(_model(None, device), views, args.steps, device)
    ft_ms, ft_out = time_steps(_model({}, device), views, args.steps, device)
    rows = []
    for name, outputs in (("without FT", plain_out), ("with FT", ft_out)):
        with tempfile.TemporaryDirectory() as folder:
            stats = ScoreStatistics(folder, timing=True, rank=0)
            for step in range(args.steps):
                stats.update(outputs, 0.2, step)
            cost = stats.overhead()
            stats.end_epoch(0)
            rows.append((name, cost["host_ms_per_update"], cost["device_ms_per_update"], stats.last_write_ms))
    print(f"device {device}, batch {args.batch}, queue 4096, torch threads {torch.get_num_threads()}")
    print(f"training step, median of {args.steps}: plain {plain_ms:.1f} ms, with FT {ft_ms:.1f} ms "
          f"(FT adds {ft_ms - plain_ms:+.1f} ms, {100 * (ft_ms - plain_ms) / plain_ms:+.1f}%)")
    for name, host, dev, write in rows:
        print(f"observer {name:>10}: {host:.2f} ms host + {dev:.2f} ms device per update "
              f"({100 * host / plain_ms:.1f}% of a plain step); writing {args.steps} steps: {write:.1f} ms")


if __name__ == "__main__":
    main()
