"""CaCo against MoCo v2 on the embedded demo data, same backbone, views, batch and epochs, one process.

Prints, for each method, kNN top-1 after every epoch, training throughput (img/s, the same machine in the
same run) and, for CaCo, what its learnable memory did: column norms and the queries' mean and max
similarity to the memory, per epoch. Each method keeps its own published optimisation, scaled to the demo:
MoCo v2 with SGD (the demo recipe's lr 0.5, wd 5e-4) and a 4096-key queue at T 0.2, m 0.99; CaCo with LARS
(lr 0.3 x batch/256, wd 1.5e-6), a 4096-column memory, tau = tau_m = 0.08, memory lr 3.0, momentum 0.99
cosine to 1, per-epoch schedules. Both: CIFAR ResNet-20 at half width, 28 px, batch 256, 1 warm-up epoch,
kNN k 50, T 0.1 on backbone features, bank = the 5,000 training images, 1,000 test images.

Usage: python benchmarks/caco_vs_mocov2_demo.py [--epochs 8] [--out runs/bench_caco]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contrastlab.config.load import load_config
from contrastlab.engine.trainer import train

COMMON = ["data.workers=1", "monitor.knn_every=1", "observers=[progress,knn,test_accuracy,localiser]", "overwrite=true",
          "train.log_every=1000"]
MOCO = ["method.name=moco", "method.proj_hidden_dim=256", "method.proj_out_dim=64", "method.queue_size=4096",
        "method.temperature=0.2", "method.symmetric=false", "train.ema_momentum=0.99"]
CACO = ["method.name=caco", "method.proj_hidden_dim=256", "method.proj_out_dim=64", "method.proj_layers=3",
        "method.memory_size=4096", "method.memory_warmup_epochs=1", "optim.name=lars", "optim.lr=0.3",
        "optim.final_lr=0.003", "optim.base_batch_size=256", "optim.weight_decay=1.5e-6",
        "train.ema_momentum=0.99", "train.ema_schedule=cosine", "train.schedule_unit=epoch"]


def run(name: str, overrides: list[str], epochs: int, out: Path) -> list[dict]:
    cfg = load_config("demo", [*COMMON, f"train.epochs={epochs}", f"out={out / name}", *overrides])
    train(cfg, f"demo/{name}", quiet=True)
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs/bench_caco_vs_mocov2")
    args = parser.parse_args()
    out = Path(args.out)
    results = {name: run(name, overrides, args.epochs, out) for name, overrides in (("mocov2", MOCO), ("caco", CACO))}
    print(f"{'epoch':>5} | {'MoCo v2 kNN':>11} {'img/s':>7} | {'CaCo kNN':>8} {'img/s':>7} | "
          f"{'|w| mean':>8} {'|w| std':>8} {'sim mean':>8} {'sim max':>8} {'idx acc':>7}")
    for m, c in zip(results["mocov2"], results["caco"]):
        p = c.get("parts", {})
        print(f"{m['epoch']:>5} | {m['knn_top1']:>11.2f} {m['img_per_s']:>7.0f} | {c['knn_top1']:>8.2f} "
              f"{c['img_per_s']:>7.0f} | {p.get('memory_norm_mean', float('nan')):>8.3f} "
              f"{p.get('memory_norm_std', float('nan')):>8.3f} {p.get('memory_query_sim_mean', float('nan')):>8.3f} "
              f"{p.get('memory_query_sim_max', float('nan')):>8.3f} {p.get('memory_index_acc', float('nan')):>7.2f}")
    print(json.dumps({name: {"final_knn_top1": r[-1]["knn_top1"],
                             "mean_img_per_s": sum(x["img_per_s"] for x in r) / len(r)} for name, r in results.items()}))


if __name__ == "__main__":
    main()
