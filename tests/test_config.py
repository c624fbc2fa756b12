"""Config loading: recipes, inheritance, overrides, validation errors, derived values."""

from __future__ import annotations

import pytest
import yaml

from contrastlab.config.derived import derive, scaled_lr
from contrastlab.config.load import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
    read_recipe,
    recipe_names,
)
from contrastlab.errors import ConfigError


def test_every_recipe_loads_and_round_trips(tmp_path):
    names = recipe_names()
    assert "demo" in names and "cifar10/simclr_r18_500ep" in names
    for name in names:
        cfg = load_config(name)
        assert read_recipe(name).get("description"), f"{name} has no description"
        path = tmp_path / "c.yaml"
        path.write_text(dump_config(cfg))  # the complete config: the method's constructor defaults written out
        assert config_to_dict(load_config(str(path)), method_defaults=True) == config_to_dict(cfg, method_defaults=True)


def test_base_inheritance_merges_sections():
    cfg = load_config("cifar10/simclr_r18_500ep")
    assert cfg.data.name == "cifar10"  # from the recipe
    assert cfg.data.batch_size == 512  # from the base
    assert cfg.optim.lr == 0.5 and cfg.model.cifar_stem is True
    assert cfg.method.name == "simclr" and cfg.method.params["temperature"] == 0.5


def test_overrides_are_typed():
    cfg = load_config("cifar10/simclr_r18_500ep", ["optim.lr=1", "seed=7", "views.scale=[0.1, 0.9]",
                                                   "data.root=/tmp/x", "method.temperature=0.2"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.seed == 7
    assert cfg.views.params["scale"] == [0.1, 0.9]
    assert cfg.data.root == "/tmp/x"
    assert cfg.method.params["temperature"] == 0.2
    assert parse_override("out=runs/a") == ("out", "runs/a")


@pytest.mark.parametrize("override,key,suggestion", [
    ("optim.lrr=0.1", "optim.lrr", "optim.lr"),
    ("data.batchsize=4", "data.batchsize", "data.batch_size"),
    ("method.temprature=0.1", "method.temprature", "method.temperature"),
    ("sed=1", "sed", "seed"),
])
def test_unknown_key_names_it_and_the_nearest(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config("cifar10/simclr_r18_500ep", [override])
    assert repr(key) in str(err.value)
    assert suggestion in str(err.value)


def test_wrong_type_and_bad_override_and_unknown_recipe():
    with pytest.raises(ConfigError, match="data.batch_size expects int"):
        load_config("demo", ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="cifar10/simclr_r18_500ep"):
        load_config("cifar10/simclr_r18_50ep")
    with pytest.raises(ConfigError, match="unknown method.name"):
        load_config("demo", ["method.name=simclrr"])


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_derived_values_follow_overrides():
    cfg = load_config("cifar10/simclr_r18_500ep", ["data.batch_size=256", "train.epochs=3", "optim.warmup_epochs=1"])
    assert scaled_lr(cfg) == pytest.approx(0.5 * 256 / 512)
    d = derive(cfg, world_size=2, dataset_len=50_000)
    assert d.per_rank_batch_size == 128
    assert d.steps_per_epoch == 50_000 // 256
    assert d.total_steps == 3 * (50_000 // 256)
    assert d.warmup_steps == 50_000 // 256
    cfg = load_config("cifar10/simclr_r18_500ep", ["optim.scale_lr=false", "data.batch_size=256"])
    assert scaled_lr(cfg) == 0.5
    with pytest.raises(ConfigError, match="divisible by the 3 ranks"):
        derive(cfg, world_size=3, dataset_len=1000)
    with pytest.raises(ConfigError, match="larger than the training set"):
        derive(cfg, world_size=1, dataset_len=100)


def test_config_from_dict_rejects_non_mapping_section():
    tree = yaml.safe_load("data: 3\n")
    with pytest.raises(ConfigError, match="section data must be a mapping"):
        config_from_dict(tree)


def test_a_version_1_config_from_a_checkpoint_still_loads():
    """Checkpoints before planners owned their keys saved every planner's views keys; the keys the chosen planner
    does not read are dropped when such a config is read back, and only then."""
    from contrastlab.config.load import (
        LEGACY_VIEWS_KEYS,
        config_from_dict,
        config_to_dict,
        upgrade_saved_config,
    )

    tree = config_to_dict(load_config("cifar10/mocov2_jointcrop_r18_500ep"))
    legacy = {"num_views": 2, "scale": [0.2, 1.0], "ratio": [0.75, 4 / 3], "num_small": 0, "small_size": 0,
              "small_scale": [0.05, 0.14], "padding": 4, "joint_beta": 0.0, "joint_epsilon": 0.1,
              "joint_fallback": "whole_image", "ccrop_alpha": 0.1, "box_warmup_epochs": 0, "box_update_every": 1,
              "box_threshold": 0.1, "heatmap": "channel_sum", "semantic_suppression": 0.5, "semantic_push_apart": True}
    assert set(legacy) == set(LEGACY_VIEWS_KEYS)
    old = {**tree, "views": {**legacy, **tree["views"]}}
    with pytest.raises(ConfigError, match="views.padding.*planner .joint_crop. reads"):
        config_from_dict(old)
    cfg = config_from_dict(upgrade_saved_config(old, version=1))
    assert cfg.views.planner == "joint_crop" and cfg.views.params == config_from_dict(tree).views.params
    with pytest.raises(ConfigError, match="views.padding"):
        config_from_dict(upgrade_saved_config(old, version=2))  # a current config keeps every key it has


def test_switching_the_planner_or_method_drops_the_keys_only_the_old_one_read(tmp_path):
    """An override or a child recipe that changes views.planner keeps the inherited keys the new one reads and drops
    the rest; one that changes method.name starts from the new method's defaults; a key given explicitly is still
    checked."""
    cfg = load_config("cifar10/mocov2_ccrop_r18_500ep", ["views.planner=padded_crop"])
    assert set(cfg.views.params) == {"num_views", "padding"} and cfg.views.params["num_views"] == 2
    with pytest.raises(ConfigError, match="views.ccrop_alpha"):
        load_config("cifar10/mocov2_ccrop_r18_500ep", ["views.planner=padded_crop", "views.ccrop_alpha=0.3"])
    cfg = load_config("demo", ["method.name=byol"])  # demo is SimCLR: its keys are not BYOL's, its head sizes neither
    assert cfg.method.params == {} and "dropped the inherited proj_hidden_dim, proj_layers, proj_out_dim" in cfg.notes[0]
    child = tmp_path / "child.yaml"
    child.write_text("base: cifar10/mocov2_jointcrop_r18_500ep\nviews: {planner: multicrop, num_small: 2}\n")
    cfg = load_config(str(child))
    assert cfg.views.planner == "multicrop" and cfg.views.params["num_small"] == 2
    assert "joint_beta" not in cfg.views.params


def test_a_config_built_in_python_reads_and_sets_the_planners_keys():
    """cfg.views.<key> reads and writes the planner's own keys; switching the planner keeps those the new one reads
    and fills in its defaults; a key the planner does not read is an error, not a silent no-op."""
    from contrastlab.config.schema import Config

    cfg = Config()
    assert cfg.views.params == {"num_views": 2, "scale": [0.2, 1.0], "ratio": [0.75, 4 / 3]}
    cfg.views.scale = [0.3, 1.0]
    cfg.views.planner = "contrastive_crop"
    assert cfg.views.scale == [0.3, 1.0] and cfg.views.ccrop_alpha == 0.1 and cfg.views.box_warmup_epochs == 0
    cfg.views.box_warmup_epochs = 3
    assert cfg.views.params["box_warmup_epochs"] == 3
    with pytest.raises(AttributeError, match="views.padding is not a key of planner 'contrastive_crop'"):
        cfg.views.padding = 2
    with pytest.raises(AttributeError, match="views has no key 'joint_beta'"):
        _ = cfg.views.joint_beta
    cfg.views.planner = "padded_crop"
    assert cfg.views.params == {"num_views": 2, "padding": 4}


def test_a_key_of_other_methods_is_refused_naming_them():
    """Feature Transformation needs InfoNCE logits: a method without them refuses method.feature_transform at load,
    naming the methods that take it."""
    from contrastlab.methods import method_kwargs
    from contrastlab.registry import METHODS

    takers = sorted(m for m in METHODS.names() if "feature_transform" in method_kwargs(m))
    assert "moco" in takers and "byol" not in takers
    with pytest.raises(ConfigError, match=rf"method 'byol' takes no key method.feature_transform: it is a key of "
                                          rf"{', '.join(takers)}"):
        load_config("demo", ["method.name=byol", "method.feature_transform={}"])
