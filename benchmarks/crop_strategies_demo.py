"""Crop strategies on the embedded demo data: RandomResizedCrop, ContrastiveCrop, SimCCrop, SemanticCrop.

One process, the demo recipe (SimCLR, CIFAR ResNet-20 at half width, 28 px Fashion-MNIST, batch 256, 8 epochs,
seed 0) with only the view planner changed, so every strategy sees the same budget, seed and optimisation:

- ``rrc``: RandomResizedCrop(scale 0.2-1), the demo's own planner;
- ``ccrop``: ContrastiveCrop, alpha 0.1 (the small-dataset value), plain crops for 3 warm-up epochs, boxes
  localised after epochs 3, 5 and 7 (heatmap threshold 0.1, channel sum): the released schedule (warm-up 100 of
  500 epochs, then every 100) scaled to 8 epochs;
- ``simccrop``: SimCCrop, the fixed central box (0.25, 0.25, 0.75, 0.75), alpha 0.1, no localiser;
- ``semcrop``: SemanticCrop (our reconstruction), the ContrastiveCrop localiser and schedule, centre density
  suppressed 0.5 at the box centre, second view in the opposite quadrant;
- ``semcrop_meansim``: the same with the mean-similarity heatmap.

Prints kNN top-1 per epoch (k 50, T 0.1, backbone features, bank = 5,000 training images, 1,000 test images), the
mean box area after each localisation, and writes a ``contrastlab views`` sheet of the final ContrastiveCrop
checkpoint on the first demo training images (``<out>/ccrop_views.png``).

Usage: python benchmarks/crop_strategies_demo.py [--epochs 8] [--out runs/bench_crops]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contrastlab.cli import main as cli
from contrastlab.config.load import load_config
from contrastlab.data import build_dataset
from contrastlab.engine.trainer import train

COMMON = ["data.workers=1", "monitor.knn_every=1", "observers=[progress,knn,test_accuracy,localiser]", "overwrite=true",
          "train.log_every=1000"]
BOXES = ["views.box_warmup_epochs=3", "views.box_update_every=2", "views.box_threshold=0.1"]
STRATEGIES = {
    "rrc": ["views.planner=random_resized"],
    "ccrop": ["views.planner=contrastive_crop", "views.ccrop_alpha=0.1", *BOXES],
    "simccrop": ["views.planner=simccrop", "views.ccrop_alpha=0.1"],
    "semcrop": ["views.planner=semantic_crop", "views.semantic_suppression=0.5", "views.semantic_push_apart=true",
                *BOXES],
    "semcrop_meansim": ["views.planner=semantic_crop", "views.heatmap=mean_similarity",
                        "views.semantic_suppression=0.5", "views.semantic_push_apart=true", *BOXES],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs/bench_crops")
    args = parser.parse_args()
    out = Path(args.out)
    history: dict[str, list[dict]] = {}
    for name, overrides in STRATEGIES.items():
        cfg = load_config("demo", [*COMMON, f"train.epochs={args.epochs}", f"out={out / name}", "seed=0", *overrides])
        train(cfg, f"demo/{name}", quiet=True)
        history[name] = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        areas = ", ".join(f"epoch {r['epoch']}: {r['box_mean_area']:.3f}" for r in history[name] if "box_mean_area" in r)
        print(f"{name:>16}: kNN " + " / ".join(f"{r['knn_top1']:.1f}" for r in history[name])
              + (f"; mean box area after localising, {areas}" if areas else ""), flush=True)

    images = out / "demo_images"
    images.mkdir(parents=True, exist_ok=True)
    demo = build_dataset("demo", None, "train")
    for i in range(4):
        demo[i][0].resize((112, 112)).save(images / f"train{i:02d}.png")
    cli(["views", "demo", *STRATEGIES["ccrop"], "--images", str(images), "--out", str(out / "ccrop_views.png"),
         "--checkpoint", str(out / "ccrop" / "checkpoints" / "last.pt")])
    print(json.dumps({name: {"final_knn_top1": h[-1]["knn_top1"], "best_knn_top1": max(r["knn_top1"] for r in h),
                             "box_mean_area": [r["box_mean_area"] for r in h if "box_mean_area" in r]}
                      for name, h in history.items()}))


if __name__ == "__main__":
    main()
