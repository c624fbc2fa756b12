"""Supervised MCL(x2) against its baseline (two independent networks, cross-entropy only) on Fashion-MNIST.

Both train the same cohort of 2 CIFAR ResNet-20 at half width for the same number of epochs with the same
seeds, from the CIFAR-100 MCL recipe's settings (SGD Nesterov lr 0.1, wd 5e-4, per-epoch cosine, pad-4
random crop + flip, MCL tau 0.1, T 3, alpha 0.1 / gamma 1 / beta 0.1 / lambda 1). Fashion-MNIST has 10
classes, so a batch of 128 is 8 classes x 16 images instead of CIFAR-100's 64 x 2. Test accuracy is taken
at the final epoch on the 10,000 test images: each peer, their mean, the best peer, the ensemble.
Prints one line per run and the mean and standard deviation over the seeds.

Needs the full Fashion-MNIST (Debian: ``apt-get install dataset-fashion-mnist``, found automatically).

A run whose directory already holds a finished ``results.json`` for the same epochs and seed is read back
instead of trained again, and an interrupted run resumes from its last checkpoint (``--fresh`` retrains all).

Usage: python benchmarks/mcl_fashion_mnist.py [--epochs 3] [--seeds 0 1 2] [--out runs/bench_mcl_fmnist] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from contrastlab.config.load import load_config
from contrastlab.engine.trainer import train

COMMON = [
    "data.name=fashion_mnist", "data.root=null", "data.batch_size=128", "data.samples_per_class=16",
    "data.workers=1", "model.arch=resnet20", "model.width=0.5", "monitor.classify_every=1",
    "monitor.max_bank=10000", "observers=[progress,knn,test_accuracy,localiser]", "train.log_every=100000",
]
RUNS = {"baseline": ["method.contrast=none"], "mcl_x2": []}
HEADS = ("peer0", "peer1", "peer_mean", "peer_best", "ensemble")


def finished_results(out: Path, epochs: int, seed: int) -> dict | None:
    """The results of a run in ``out`` that finished ``epochs`` epochs with ``seed``, or None."""
    results_file, config_file = out / "results.json", out / "config.yaml"
    if not (results_file.exists() and config_file.exists()):
        return None
    results = json.loads(results_file.read_text())
    config = yaml.safe_load(config_file.read_text())
    if results.get("epochs") != epochs or config.get("seed") != seed or "test_top1" not in results:
        return None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_mcl_fmnist")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    args = parser.parse_args()
    table: dict[str, list[dict]] = {name: [] for name in RUNS}
    for seed in args.seeds:
        for name, extra in RUNS.items():
            out = Path(args.out) / f"{name}_seed{seed}"
            results = None if args.fresh else finished_results(out, args.epochs, seed)
            if results is None:
                interrupted = not args.fresh and (out / "checkpoints" / "last.pt").exists()
                start = ["resume=auto"] if interrupted else ["overwrite=true"]
                cfg = load_config("cifar100/mcl_x2_r32_300ep", [*COMMON, *extra, *start, f"train.epochs={args.epochs}",
                                                                 f"seed={seed}", f"out={out}"])
                results = train(cfg, f"fashion_mnist/{name}", quiet=True)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            row = {**results["test_top1"], "img_per_s": sum(r["img_per_s"] for r in records) / len(records)}
            table[name].append(row)
            print(f"{name:>8} seed {seed}: " + ", ".join(f"{h} {row[h]:.2f}" for h in HEADS)
                  + f", {row['img_per_s']:.0f} img/s", flush=True)
    summary = {}
    for name, rows in table.items():
        summary[name] = {h: (statistics.mean(r[h] for r in rows), statistics.stdev(r[h] for r in rows)
                             if len(rows) > 1 else 0.0) for h in HEADS}
        print(f"{name:>8} over seeds {args.seeds}: "
              + ", ".join(f"{h} {m:.2f} +- {s:.2f}" for h, (m, s) in summary[name].items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
