"""Per-step losses of fixed-seed smoke runs, recorded before the library redesign (issue 17) and checked after it.

Each case is a recipe's ``--smoke`` run (the embedded demo data, a CPU, fixed seed) with a few more steps, trained
through the CPU-worker and the batched view pipeline. The loss of every optimiser step is read with a global
module forward hook, which sees each method's :class:`~contrastlab.methods.base.StepOutput` whatever the engine
looks like, so the same probe measures the code before and after a restructuring.

``python tests/step_losses.py`` rewrites ``tests/data/step_losses.json`` from the current code: run it only
on the code the reference should come from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "step_losses.json"

# name -> (recipe, extra overrides on top of --smoke). Four steps each; the ContrastiveCrop case trains two
# epochs of two steps with a localisation between them, the FT case records score statistics.
# The recipes' values of issue 18 (ContrastiveCrop's per-epoch cosine to 10% of the peak, its released crop
# placement) came after the recording: SMALL_AS_RECORDED sets the small-dataset recipes back to the per-step cosine
# to 0 and the centred placement they had then.
SMALL_AS_RECORDED = ["train.schedule_unit=step", "optim.final_lr_ratio=null"]
CCROP_AS_RECORDED = ["views.ccrop_placement=centre"]
HEAD_AS_RECORDED = ["method.proj_hidden_bn=true"]  # the released heads (no hidden BatchNorm) came after the recording
CASES: dict[str, tuple[str, list[str]]] = {
    "simclr": ("cifar10/simclr_r18_500ep", ["train.max_steps=4", *SMALL_AS_RECORDED, *HEAD_AS_RECORDED]),
    "mocov2_ccrop": ("cifar10/mocov2_ccrop_r18_500ep", ["data.epoch_length=16", "train.max_steps=4",
                                                        *SMALL_AS_RECORDED, *CCROP_AS_RECORDED, *HEAD_AS_RECORDED]),
    "caco": ("cifar10/caco_r18_500ep", ["train.max_steps=4"]),
    "mcl": ("cifar100/mcl_x2_r32_300ep", ["train.max_steps=4"]),
    "mocov3_jointcrop": ("imagenet/mocov3_jointcrop_r50_100ep", ["train.max_steps=3"]),
    "ft_scores": ("cifar10/mocov2_ft_r18_500ep", ["observers=[progress,knn,test_accuracy,score_statistics,localiser]",
                                                  "train.max_steps=4", *SMALL_AS_RECORDED, *HEAD_AS_RECORDED]),
}
PIPELINES = ("cpu", "gpu")


def step_losses(case: str, pipeline: str, out: Path) -> list[float]:
    """The loss of every training forward pass of ``case`` through ``pipeline`` (``cpu`` or ``gpu``)."""
    from contrastlab.cli import _load
    from contrastlab.engine.trainer import train
    from contrastlab.methods.base import StepOutput

    recipe, extra = CASES[case]
    cfg = _load(recipe, [f"out={out}", "observers=[progress,knn,test_accuracy,localiser]", f"data.pipeline={pipeline}", *extra], smoke=True)
    losses: list[float] = []

    def record(module, args, output):
        if isinstance(output, StepOutput) and module.training:
            losses.append(float(output.loss.detach()))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one float reduction order, whatever the machine's core count
    try:
        train(cfg, recipe, quiet=True)
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    return losses


def main() -> None:
    import tempfile

    table: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            table[case] = {}
            for pipeline in PIPELINES:
                table[case][pipeline] = step_losses(case, pipeline, Path(tmp) / f"{case}_{pipeline}")
                print(case, pipeline, table[case][pipeline], file=sys.stderr, flush=True)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
