"""The demo-budget recipes of DINO, SwAV, Barlow Twins and VICReg (issue 25) train what the demo trains - the same data,
backbone, batch, epochs, views, kNN monitor and linear probe - and differ from it only in the method and its
optimisation, so that their kNN and the crop plug-ins on them compare with the demo's SimCLR. The demo's values are
written out here, so that a change to demo.yaml that these recipes would silently follow fails."""

from __future__ import annotations

import pytest

from contrastlab.config.load import load_config
from contrastlab.studies.study import Study

RECIPES = {"demo/dino_r20_8ep": "dino", "demo/swav_r20_8ep": "swav", "demo/barlow_twins_r20_8ep": "barlow_twins",
           "demo/vicreg_r20_8ep": "vicreg"}


def test_the_demo_has_the_values_written_here():
    cfg = load_config("demo")
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.workers) == ("demo", 256, 1)
    assert (cfg.views.planner, cfg.views.num_views, list(cfg.views.scale), cfg.views.photometric) == (
        "random_resized", 2, [0.2, 1.0], "small")
    assert (cfg.model.arch, cfg.model.cifar_stem, cfg.model.width) == ("resnet20", False, 0.5)
    assert (cfg.train.epochs, cfg.monitor.knn_every, cfg.monitor.knn_k, cfg.monitor.knn_temperature) == (8, 1, 50, 0.1)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_demo_method_recipe_shares_the_demo_settings(recipe):
    cfg, demo = load_config(recipe), load_config("demo")
    assert cfg.method.name == RECIPES[recipe]
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.workers) == ("demo", 256, 1)
    assert (cfg.views.planner, cfg.views.num_views, list(cfg.views.scale), cfg.views.photometric) == (
        "random_resized", 2, [0.2, 1.0], "small")
    assert (cfg.model.arch, cfg.model.cifar_stem, cfg.model.width) == ("resnet20", False, 0.5)
    assert (cfg.train.epochs, cfg.monitor.knn_every, cfg.monitor.knn_k, cfg.monitor.knn_temperature) == (8, 1, 50, 0.1)
    assert "8 epochs" in cfg.description  # the recipe is named _8ep
    # everything but the method, the optimiser and the teacher's momentum is the demo's, defaults included
    for section in ("data", "views", "model", "monitor", "linear", "log"):
        assert getattr(cfg, section) == getattr(demo, section), section
    assert (cfg.seed, cfg.observers, cfg.train.precision, cfg.train.device) == (
        demo.seed, demo.observers, demo.train.precision, demo.train.device)


def test_the_base_methods_demo_study_crosses_six_methods_with_the_demo_studys_crops():
    """The study of issue 25: SimCLR, MoCo v2 and the four recipes above x the demo study's three crop laws, with the
    demo study's override sets, x 3 seeds."""
    study, demo = Study.load("base_methods_demo"), Study.load("demo")
    assert len(study.cells()) == 54 and study.seeds == demo.seeds == (0, 1, 2)
    recipes = {"simclr": "demo", "mocov2": "demo/mocov2_r20_8ep", **{m: r for r, m in RECIPES.items()}}
    crops = {g.name.split("_", 1)[1]: g.overrides for g in demo.groups if g.name.startswith("simclr_")}
    assert set(crops) == {"rrc", "ccrop", "jointcrop"}
    assert {g.name: (g.recipe, g.overrides) for g in study.groups} == {
        f"{m}_{c}": (recipe, overrides) for m, recipe in recipes.items() for c, overrides in crops.items()}
