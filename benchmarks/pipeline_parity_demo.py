"""The demo trained through both input pipelines with the same seeds: final kNN top-1 side by side.

``data.pipeline=cpu`` renders views with PIL in DataLoader workers; ``data.pipeline=gpu`` holds the demo images
on the device and renders them in batches (here on the CPU's tensors when no GPU is present). Both use the
demo recipe unchanged (SimCLR, ResNet-20 half width, 8 epochs; kNN k 50, T 0.1 on the 1,000 test images).

Usage: python benchmarks/pipeline_parity_demo.py [--seeds 0 1 2] [--out runs/parity]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from contrastlab.config.load import load_config
from contrastlab.engine.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/parity")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"cpu": [], "gpu": []}
    for seed in args.seeds:
        for pipeline in ("cpu", "gpu"):
            out = Path(args.out) / f"{pipeline}_seed{seed}"
            done = out / "results.json"
            if done.is_file():  # resume an interrupted comparison
                record = json.loads(done.read_text())
            else:
                start = time.perf_counter()
                record = train(load_config("demo", [f"out={out}", f"seed={seed}", f"data.pipeline={pipeline}",
                                                    "overwrite=true"]), "demo", quiet=True)
                record["wall_s"] = time.perf_counter() - start
                done.write_text(json.dumps(record, indent=2))
            results[pipeline].append(record["knn_top1"])
            print(f"seed {seed} {pipeline}: kNN top-1 {record['knn_top1']:.2f}%  ({record.get('wall_s', 0):.0f} s)",
                  flush=True)
    for pipeline, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{pipeline}: mean {statistics.mean(values):.2f} +- {spread:.2f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
