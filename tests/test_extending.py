"""docs/extending.md's examples, as written there: a crop law, a method, a dataset and an observer defined outside the
package.

Each is registered through the public API from its own file (the ``plugins`` config key) and trained by a
``--smoke`` run on the embedded data; the crop law through both the CPU-worker and the batched view pipeline, and
its batched law is compared with its per-image law as every built-in planner's is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_batch_planners import batch_boxes, cpu_boxes, law_mismatches

from contrastlab.cli import main
from contrastlab.registry import DATASETS, METHODS, OBSERVERS, PLANNERS, import_plugin

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "extending.md"
EXAMPLES = {"crop law": "examples/extending/nested_crop.py", "method": "examples/extending/barlow_twins.py",
            "dataset": "examples/extending/npz_images.py", "observer": "examples/extending/loss_trace.py"}


@pytest.fixture(autouse=True)
def forget_the_examples():
    """Each test imports an example, which registers its name for good: remove it afterwards, so the other tests see
    the built-in registries only (and a later import registers it again)."""
    import sys

    yield
    PLANNERS.unregister("nested_crop")
    METHODS.unregister("my_barlow_twins")
    DATASETS.unregister("npz_images")
    OBSERVERS.unregister("loss_trace")
    for name in [n for n in sys.modules if n.startswith("contrastlab_plugin_")]:
        del sys.modules[name]


def doc_files() -> dict[str, str]:
    """The doc's code blocks that start with ``# file: PATH``: path -> the code below that line."""
    blocks = re.findall(r"```python\n# file: (\S+)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return dict(blocks)


def test_the_doc_shows_each_example_file_as_it_is():
    shown = doc_files()
    assert sorted(shown) == sorted(EXAMPLES.values())
    for path, code in shown.items():
        assert (ROOT / path).read_text() == code, f"docs/extending.md shows another {path}; copy the file into the doc"


def smoke(tmp_path: Path, name: str, *overrides: str) -> dict:
    out = tmp_path / name
    assert main(["train", "demo", "--smoke", f"out={out}", "observers=[knn]", *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and np.isfinite(results["final_loss"])
    return {**results, **json.loads((out / "run.json").read_text())}


def test_crop_law_example(tmp_path):
    path = str(ROOT / EXAMPLES["crop law"])
    import_plugin(path)
    planner = PLANNERS["nested_crop"](scale=(0.4, 1.0), inner=(0.3, 0.7))
    batched = batch_boxes(planner, 2000, 48, 40, seed=1)
    cpu = cpu_boxes(planner, 800, 48, 40, seed=2)
    assert law_mismatches(batched, cpu) == []
    outer, inner = batched[:, 0], batched[:, 1]
    assert np.all((inner[:, 0] >= outer[:, 0]) & (inner[:, 2] <= outer[:, 2]) & (inner[:, 1] >= outer[:, 1])
                  & (inner[:, 3] <= outer[:, 3]))  # the local view lies inside the global one
    for pipeline, fed_by in (("cpu", "cpu-workers"), ("gpu", "gpu-resident")):
        run = smoke(tmp_path, pipeline, f"plugins=[{path}]", "views.planner=nested_crop", "views.inner=[0.4,0.6]",
                    f"data.pipeline={pipeline}")
        assert run["input_pipeline"] == fed_by


def test_method_example(tmp_path):
    path = str(ROOT / EXAMPLES["method"])
    import_plugin(path)
    module = __import__(METHODS["my_barlow_twins"].__module__)
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    on, off = module.barlow_twins_loss(z1, z2, 0.5)
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)  # the cross-correlation entry by entry
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    c = [[sum(float(a[n, i] * b[n, j]) for n in range(6)) / 6 for j in range(4)] for i in range(4)]
    assert float(on) == pytest.approx(sum((1 - c[i][i]) ** 2 for i in range(4)))
    assert float(off) == pytest.approx(0.5 * sum(c[i][j] ** 2 for i in range(4) for j in range(4) if i != j))
    run = smoke(tmp_path, "barlow", f"plugins=[{path}]", "method.name=my_barlow_twins", "method.proj_hidden_dim=32",
                "method.proj_out_dim=32")
    metrics = [json.loads(line) for line in (tmp_path / "barlow" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]["parts"]) == {"on_diagonal", "off_diagonal"}
    assert run["knn_top1"] >= 0


def test_dataset_example(tmp_path):
    from contrastlab.data import build_dataset

    path = str(ROOT / EXAMPLES["dataset"])
    root = tmp_path / "npz"
    root.mkdir()
    for split, n in (("train", 96), ("test", 48)):
        demo = build_dataset("demo", None, split)
        np.savez(root / f"{split}.npz", images=demo.data[:n, :, :, 0], labels=np.array(demo.targets[:n]))
    import_plugin(path)
    data = DATASETS["npz_images"](root, "test")
    image, label, index = data[5]
    assert image.mode == "RGB" and image.size == (28, 28) and (label, index) == (build_dataset("demo", None,
                                                                                               "test").targets[5], 5)
    run = smoke(tmp_path, "npz_run", f"plugins=[{path}]", "data.name=npz_images", f"data.root={root}",
                "data.pipeline=gpu")
    assert run["input_pipeline"] == "gpu-resident"
    assert main(["train", "demo", "--smoke", f"out={tmp_path / 'bad'}", f"plugins=[{path}]",
                 "data.name=npz_images", f"data.root={tmp_path / 'missing'}"]) == 2


def test_observer_example(tmp_path):
    path = str(ROOT / EXAMPLES["observer"])
    out = tmp_path / "traced"
    assert main(["train", "demo", "--smoke", f"out={out}", f"plugins=[{path}]", "observers+=[loss_trace]",
                 "train.max_steps=3", "train.log_every=1"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["steps_traced"] == 3 and "knn_top1" in record  # the recipe's observers kept, the trace added
    losses = json.loads((out / "results.json").read_text())
    assert record["loss_last_step"] == pytest.approx(losses["last_step_loss"])  # the observer and the trainer agree
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["observers"]["loss_trace"]
    assert len(state["trace"]) == 3 and state["trace"][-1] == record["loss_last_step"]


def test_the_doc_lists_every_attribute_of_run():
    from contrastlab.observers.base import Run

    table = DOC.read_text().split("What an observer reads of the run", 1)[1].split("and what it may ask", 1)[0]
    first_cells = [row.split("|")[1] for row in table.splitlines() if row.startswith("| `")]
    listed = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    public = {name for name in dir(Run(None)) if not name.startswith("_")}
    asks = {"log", "log_metrics", "request_stop", "stop_requested"}
    assert listed == public - asks, (sorted(public - asks - listed), sorted(listed - public))
