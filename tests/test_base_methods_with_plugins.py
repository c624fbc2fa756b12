"""Every crop law trains with every base method beyond InfoNCE (DINO, SwAV, Barlow Twins, VICReg), through both view
pipelines (issue 25): two steps on the embedded data with tiny heads, the ContrastiveCrop family's localiser between
its two one-step epochs; and where a plug-in does not apply, the config is refused with the reason."""

from __future__ import annotations

import json
import math

import pytest

from contrastlab.cli import _load
from contrastlab.engine.trainer import train
from contrastlab.errors import ConfigError
from contrastlab.registry import PLANNERS

TINY_HEADS = {
    "dino": ["method.out_dim=32", "method.hidden_dim=16", "method.bottleneck_dim=8"],
    "swav": ["method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.num_prototypes=10", "method.queue_length=0"],
    "barlow_twins": ["method.proj_hidden_dim=16", "method.proj_out_dim=16"],
    "vicreg": ["method.proj_hidden_dim=16", "method.proj_out_dim=16"],
}

LOCALISED = ("contrastive_crop", "semantic_crop")
"""The crop laws whose boxes the localiser refreshes from the encoder's heatmaps (on whole images, one view each,
whatever views the method trains on)."""


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
@pytest.mark.parametrize("method", list(TINY_HEADS))
def test_every_planner_trains_with_the_method(method, pipeline, tmp_path):
    for planner in PLANNERS.names():
        out = tmp_path / planner
        cfg = _load("demo", [f"out={out}", f"method.name={method}", *TINY_HEADS[method], f"views.planner={planner}",
                             "observers=[localiser]", "log.to=[jsonl]", "model.width=0.25", "data.subset=16",
                             f"data.pipeline={pipeline}", "train.checkpoint_every=0"], smoke=True)
        results = train(cfg, f"{method}+{planner}", quiet=True)
        assert results["steps"] == 2 and math.isfinite(results["final_loss"]), planner
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if planner in LOCALISED:
            assert 0 < records[0]["box_mean_area"] <= 1, planner  # the localiser refreshed the boxes after epoch 1


@pytest.mark.parametrize("method", list(TINY_HEADS))
def test_feature_transformation_is_refused_naming_the_methods_that_take_it(method):
    with pytest.raises(ConfigError, match=rf"method '{method}' takes no key method.feature_transform: it is a key "
                                          r"of .*moco.*InfoNCE logits"):
        _load("demo", [f"method.name={method}", "method.feature_transform={}"], smoke=True)
