"""A restructuring changes no draw, order or formula of training: fixed-seed smoke runs probed step by step
(``tests/step_losses.py``) against ``tests/data/step_losses.json``.

Six cases (SimCLR, MoCo v2 + ContrastiveCrop with a localisation between its two epochs, CaCo with its warm start,
supervised MCL, MoCo v3 + JointCrop on a ResNet-50, MoCo v2 + FT with score statistics), each through the CPU-worker
and the batched view pipeline. On every machine: the batch order and the planned boxes are equal, the rendered
views and the first step's loss (float32 as trained and float64 recomputed) agree to a tolerance far below what any
changed draw or formula moves them by, and the first step's float64 gradients to 2% (see the probe's docstring for
why no closer). The first step's loss is also checked against the losses recorded from the code before the
redesign of issue 17. Bit for bit, the whole loss trajectory on the machines that recorded one (a few steps at the
recipes' learning rates amplify rounding: on another CPU, or under another ``ATEN_CPU_CAPABILITY``, the third step's
loss differs by up to a few percent).
"""

from __future__ import annotations

import fcntl
import json

import pytest
from step_losses import CASES, PIPELINES, REFERENCE, machine, probe

pytestmark = pytest.mark.numerics  # `make test` runs these on torch's scalar kernels

RECORDED = json.loads(REFERENCE.read_text())
VIEW_SUM_TOLERANCE = {"rel": 1e-6, "abs": 1e-3}  # a sum of ~10^3 values in [-3, 3]; a moved box changes it by > 1


@pytest.fixture(scope="session")
def probes(session_folder):
    """Each case's probe, run once per test session: under pytest-xdist the first worker that needs it runs it and
    writes its record, and a worker that needs it meanwhile waits for that record (a case's first-step and
    trajectory tests often run on different workers). A session is one set of kernels."""
    shared = session_folder / "step-probes"
    shared.mkdir(exist_ok=True)

    def get(case: str, pipeline: str) -> dict:
        record = shared / f"{case}_{pipeline}.json"
        with open(shared / f"{case}_{pipeline}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not record.is_file():
                got = probe(case, pipeline, shared / f"{case}_{pipeline}" / "run")
                record.write_text(json.dumps(got))
        return json.loads(record.read_text())  # floats round-trip exactly through JSON

    return get


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("case", list(CASES))
def test_draws_views_and_first_step_are_those_recorded(case, pipeline, probes):
    got, expected = probes(case, pipeline), RECORDED[case][pipeline]
    assert got["indices"] == expected["indices"]  # the batch order, every step
    assert got["boxes"] == expected["boxes"]  # every box planned before the first localisation
    assert len(got["views"]) == len(expected["views"])
    for step, (views, recorded) in enumerate(zip(got["views"], expected["views"])):
        for v, (sums, sums_recorded) in enumerate(zip(views, recorded)):
            assert len(sums) == len(sums_recorded)
            for sample, (pair, pair_recorded) in enumerate(zip(sums, sums_recorded)):
                assert pair == pytest.approx(pair_recorded, **VIEW_SUM_TOLERANCE), f"step {step + 1}, view {v}, {sample}"
    first, first_recorded = got["first_step"], expected["first_step"]
    assert got["losses"][0] == pytest.approx(expected["losses_before_redesign"][0], rel=1e-5)
    assert first["loss_float64"] == pytest.approx(first_recorded["loss_float64"], rel=2e-6)
    assert first["grad_norms_float64"].keys() == first_recorded["grad_norms_float64"].keys()
    for group, norm in first["grad_norms_float64"].items():
        assert norm == pytest.approx(first_recorded["grad_norms_float64"][group], rel=2e-2), group


# In reverse order: two xdist workers that start on the two halves of these tests (the whole numerics pass) then
# probe different cases instead of one waiting for the other's probe of the same case.
@pytest.mark.parametrize("pipeline", PIPELINES[::-1])
@pytest.mark.parametrize("case", list(CASES)[::-1])
def test_loss_trajectory_is_the_one_recorded_on_this_machine(case, pipeline, probes):
    recorded = RECORDED[case][pipeline]["losses_by_machine"]
    here = machine()
    if here not in recorded:
        pytest.skip(f"no trajectory recorded on this machine ({here}); recorded on: {'; '.join(recorded)}")
    assert probes(case, pipeline)["losses"] == recorded[here]
