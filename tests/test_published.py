"""Published numbers as data (``contrastlab.studies.published``) and ``contrastlab published``.

The expected row counts, epochs, datasets and spot values are written here from the published tables themselves
(btzyd/JointCrop and facebookresearch/moco-v3 READMEs, the JointCrop appendix, winycg/MCL README,
maple-research-lab/CaCo README, DTennant/CL-Visualizing-Feature-Transformation README, vturrisi/solo-learn README,
the DINO, SwAV, Barlow Twins and VICReg READMEs and papers), never computed from the data file.
"""

from __future__ import annotations

import functools
import re

import pytest
import yaml

from contrastlab.cli import main
from contrastlab.config.load import load_config, recipe_names
from contrastlab.errors import ContrastlabError
from contrastlab.studies.published import FIELDS, METRICS, load_rows, row, rows, tables

# table id -> number of published numbers in it, as the paper / README prints them
TABLE_COUNTS = {
    "mocov3_jointcrop_100ep": 2,  # JointCrop README: MoCo v3 68.9, + JointCrop(0) 69.47
    "mocov3_jointcrop_300ep": 2,  # 72.8, 73.23
    "mocov3_jointcrop_1000ep": 1,  # MoCo v3 74.6; JointCrop's cell is "-"
    "mocov3_vit_300ep": 4,  # ViT-S / ViT-B x (linear, end-to-end fine-tuned)
    "mocov3_vit_b_transfer": 4,  # ViT-B to CIFAR-10, CIFAR-100, Flowers, Pets
    "jointcrop_appendix_mocov1": 6,  # baseline, + CCrop, + JointCrop, + JointBlur, one-of, JointCrop + CCrop positions
    "jointcrop_appendix_dino": 3,  # multi-crop, JointCrop on the global pair, on the local pairs
    "mcl_cifar100": 8 * 3,  # 8 networks x (baseline, MCL(x2), MCL(x4))
    "mcl_cifar100_kd": 5 * 2,  # 5 networks x (baseline, MCL(x4) + logit KD)
    "mcl_imagenet": 4 + 3,  # ResNet-18: 4 columns; ResNet-34: 3 (its logit-KD cell is "-")
    "mcl_moco_imagenet": 2,  # MoCo, MoCo + MCL(x2)
    "caco_imagenet": 4,  # 200/1024, 200/4096, 800/4096, 800 multi-crop/2048
    "ft_imagenet_linear": 5,  # supervised, MoCo v1, + FT, MoCo v2, + FT
    "ft_voc_detection": 5,
    "ft_coco_detection": 5,
    "ft_imagenet100_linear": 1,  # MoCo-v1+FT 77.2
    "solo_learn_cifar10": 4 * 2,  # DINO, SwAV, Barlow Twins, VICReg x (Acc@1, Acc@5)
    "solo_learn_cifar100": 4 * 2,
    "dino_imagenet": 3 * 2,  # ViT-S/16 at 100, 300, 800 epochs x (linear, k-NN)
    "swav_imagenet": 7,  # 800, 400, 200, 100 epochs at 4096; 200, 400 at 256; 400 without multi-crop
    "barlow_twins_imagenet": 3,  # 1000 ep README 73.5, paper 73.2; 300 ep ablation baseline 71.4
    "vicreg_imagenet": 1,
}

# table id -> (dataset, epochs of pre-training), or a per-row epochs mapping where a table mixes lengths
TABLE_SETTINGS: dict[str, tuple[str | None, int | dict[str, int] | None]] = {
    "mocov3_jointcrop_100ep": ("imagenet", 100),
    "mocov3_jointcrop_300ep": ("imagenet", 300),
    "mocov3_jointcrop_1000ep": ("imagenet", 1000),
    "mocov3_vit_300ep": ("imagenet", 300),
    "mocov3_vit_b_transfer": ("imagenet", 300),
    "jointcrop_appendix_mocov1": (None, None),  # the appendix states neither epochs nor batch: no recipe
    "jointcrop_appendix_dino": (None, None),
    "mcl_cifar100": ("cifar100", 300),
    "mcl_cifar100_kd": ("cifar100", 300),
    "mcl_imagenet": ("imagenet", 90),
    "mcl_moco_imagenet": ("imagenet", 200),
    "caco_imagenet": ("imagenet", {"caco/r50_200ep_bs1024": 200, "caco/r50_200ep_bs4096": 200,
                                   "caco/r50_800ep_bs4096": 800, "caco/multicrop_r50_800ep_bs2048": 800}),
    "ft_imagenet_linear": ("imagenet", {"supervised": 90, "*": 200}),
    "ft_voc_detection": ("imagenet", {"supervised": 90, "*": 200}),
    "ft_coco_detection": ("imagenet", {"supervised": 90, "*": 200}),
    "ft_imagenet100_linear": ("imagenet100", 200),
    "solo_learn_cifar10": ("cifar10", 1000),
    "solo_learn_cifar100": ("cifar100", 1000),
    "dino_imagenet": ("imagenet", {"100ep": 100, "300ep": 300, "800ep": 800}),
    "swav_imagenet": ("imagenet", {"swav/r50_800ep": 800, "swav/r50_400ep": 400, "swav/r50_200ep": 200,
                                   "swav/r50_100ep": 100, "swav/r50_200ep_bs256": 200, "swav/r50_400ep_bs256": 400,
                                   "swav/r50_400ep_2x224": 400}),
    "barlow_twins_imagenet": ("imagenet", {"1000ep": 1000, "300ep": 300}),
    "vicreg_imagenet": ("imagenet", 1000),
}

# spot values: row id -> (value, std, runs) as printed in the source
SPOT_VALUES = {
    "mocov3_jointcrop/r50_100ep/mocov3": (68.9, None, None),
    "mocov3_jointcrop/r50_100ep/jointcrop": (69.47, None, None),
    "mocov3_jointcrop/r50_300ep/jointcrop": (73.23, None, None),
    "mocov3_jointcrop/r50_1000ep/mocov3": (74.6, None, None),
    "mocov3/vit_s_300ep/finetune": (81.4, None, None),
    "mocov3/vit_b_300ep/linear": (76.7, None, None),
    "mocov3/vit_b_300ep/transfer_pets": (93.2, None, None),
    "jointcrop_appendix/mocov1/randomcrop": (57.25, None, None),
    "jointcrop_appendix/mocov1/jointcrop_ccrop_positions": (61.33, None, None),
    "jointcrop_appendix/dino/jointcrop_local": (66.58, None, None),
    "mcl_cifar100/r32/baseline": (70.91, 0.14, 3),
    "mcl_cifar100/r110/x4": (78.82, 0.14, 3),
    "mcl_cifar100/shufflev2_05x/x2": (69.55, 0.22, 3),
    "mcl_cifar100_kd/wrn28_4/baseline": (79.17, 0.29, 3),
    "mcl_cifar100_kd/hcgnet_a2/x4_kd": (82.47, 0.20, 3),
    "mcl_cifar100_kd/wrn40_2/baseline": (76.89, None, 3),
    "mcl_imagenet/r18/x4_kd": (70.82, None, None),
    "mcl_imagenet/r34/baseline": (73.30, None, None),
    "mcl_moco_imagenet/r18_200ep/mcl_x2": (48.04, 0.13, 3),
    "caco/r50_200ep_bs4096": (72.0, None, None),
    "caco/multicrop_r50_800ep_bs2048": (75.7, None, None),
    "ft/r50/mocov1/linear": (60.6, None, None),
    "ft/r50/mocov2_ft/voc_ap50": (83.3, None, None),
    "ft/r50/supervised/coco_ap": (38.2, None, None),
    "ft/imagenet100/mocov1_ft/linear": (77.2, None, None),
    "solo_learn_cifar10/vicreg/top1": (92.07, None, None),
    "solo_learn_cifar100/swav/top5": (88.78, None, None),
    "dino/vit_s16_300ep/knn": (73.3, None, None),
    "swav/r50_400ep_2x224": (70.1, None, None),
    "barlow_twins/r50_1000ep/readme": (73.5, None, None),
    "vicreg/r50_1000ep": (73.2, None, None),
}

# protocol -> the metrics it can report
PROTOCOL_METRICS = {"linear": {"linear_top1", "linear_top5"}, "knn": {"knn_top1"}, "finetune": {"finetune_top1"},
                    "supervised": {"test_top1"}, "detection": {"voc_ap50", "coco_ap"}, "transfer": {"transfer_top1"}}


@functools.cache
def _resolved(recipe: str):
    return load_config(recipe)


def _dataset(cfg) -> str:
    """``imagenet`` / ``imagenet100`` for ImageFolder recipes (by class list), else the dataset's name."""
    if cfg.data.name == "imagefolder":
        return cfg.data.class_list or "imagenet"
    return cfg.data.name


def _expected_epochs(table: str, row_id: str) -> int | None:
    epochs = TABLE_SETTINGS[table][1]
    if not isinstance(epochs, dict):
        return epochs
    if row_id in epochs:
        return epochs[row_id]
    keys = [k for k in epochs if k != "*" and re.search(rf"(^|[/_]){re.escape(k)}($|[/_])", row_id)]
    assert len(keys) <= 1, (row_id, keys)
    return epochs[keys[0]] if keys else epochs["*"]


def test_every_table_has_the_rows_the_paper_prints() -> None:
    counts = {name: len(items) for name, items in tables().items()}
    assert counts == TABLE_COUNTS
    assert len(rows()) == sum(TABLE_COUNTS.values()) == 118


def test_every_recipe_a_row_names_exists_and_resolves_to_its_epochs_and_dataset() -> None:
    names = set(recipe_names())
    for item in rows():
        dataset, _ = TABLE_SETTINGS[item.table]
        epochs = _expected_epochs(item.table, item.id)
        if dataset is None:
            assert item.recipes == () and "No recipe" in item.note, item.id
            continue
        assert item.recipes, item.id
        for recipe in item.recipes:
            assert recipe in names, (item.id, recipe)
            cfg = _resolved(recipe)
            assert (_dataset(cfg), cfg.train.epochs) == (dataset, epochs), (item.id, recipe)


def test_eval_recipes_exist_and_fit_the_protocol() -> None:
    names = set(recipe_names())
    for item in rows():
        assert item.metric in METRICS, item.id
        assert item.metric in PROTOCOL_METRICS[item.protocol], item.id
        if item.eval_recipe is not None:
            assert item.eval_recipe in names, item.id
            assert item.eval_recipe.split("/")[0] == item.protocol, item.id  # linear/ for linear, finetune/ ...
        if item.protocol == "finetune":
            assert item.eval_recipe is not None, item.id
        if item.protocol in ("detection", "transfer"):  # outside contrastlab: the export that feeds them
            assert item.eval_recipe is None and "contrastlab export" in item.note, item.id
    assert {r.id for r in rows() if r.protocol == "detection"} and all(
        "--format detectron2" in r.note for r in rows() if r.protocol == "detection")


def test_ids_are_unique_lowercase_and_spot_values_match_the_sources() -> None:
    ids = [item.id for item in rows()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9_./]+", i) for i in ids)
    for row_id, (value, std, runs) in SPOT_VALUES.items():
        item = row(row_id)
        assert (item.value, item.std, item.runs) == (value, std, runs), row_id


def test_mcl_kd_table_repeats_the_baselines_of_the_main_table() -> None:
    """The README's logit-KD table prints the WRN-16-2, WRN-40-2 and ShuffleNetV2 1x baselines of the main table."""
    for arch in ("wrn16_2", "wrn40_2", "shufflev2_1x"):
        assert row(f"mcl_cifar100_kd/{arch}/baseline").value == row(f"mcl_cifar100/{arch}/baseline").value
        assert row(f"mcl_cifar100_kd/{arch}/baseline").recipes == row(f"mcl_cifar100/{arch}/baseline").recipes


def test_filters_and_lookup() -> None:
    assert [r.id for r in rows("caco_imagenet")] == ["caco/r50_200ep_bs1024", "caco/r50_200ep_bs4096",
                                                     "caco/r50_800ep_bs4096", "caco/multicrop_r50_800ep_bs2048"]
    assert {r.id for r in rows("solo_learn_cifar1*/dino/top1")} == {"solo_learn_cifar10/dino/top1",
                                                                    "solo_learn_cifar100/dino/top1"}
    assert {r.id for r in rows("imagenet/mocov3_jointcrop_r50_300ep")} == {"mocov3_jointcrop/r50_300ep/jointcrop"}
    assert rows("MCL_IMAGENET/R34/X2") == rows("mcl_imagenet/r34/x2") != []
    assert rows("no such row") == []
    assert list(tables())[:2] == ["mocov3_jointcrop_100ep", "mocov3_jointcrop_300ep"]
    with pytest.raises(ContrastlabError, match=r"mcl_cifar100/r110/x4"):
        row("mcl_cifar100/r110/x5")


def test_cli_lists_a_row_with_its_value(capsys) -> None:
    assert main(["published", "mcl_cifar100/r110"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    x4 = next(line for line in lines if line.startswith("mcl_cifar100/r110/x4 "))
    assert "cifar100/mcl_x4_r110_300ep" in x4 and "78.82 +- 0.14 (n=3)" in x4 and "winycg/MCL" in x4
    starts = {line.index("cifar100/") for line in lines}  # the recipe column is aligned
    assert len(starts) == 1

    assert main(["published", "mcl_cifar100_kd/hcgnet_a2/baseline"]) == 0
    assert "79.00 +- 0.41 (n=3)" in capsys.readouterr().out  # value and std printed with the same decimals

    assert main(["published", "ft/r50/mocov2_ft/voc*", "--long"]) == 0
    out = capsys.readouterr().out
    assert "83.3" in out and "detection" in out and "contrastlab export" in out and "--format detectron2" in out


def test_cli_without_a_match_exits_2_naming_the_filter(capsys) -> None:
    assert main(["published", "no_such_table"]) == 2
    assert "no published row matches 'no_such_table'" in capsys.readouterr().err


VALID = {"id": "demo/r18/x", "recipes": ["demo"], "protocol": "knn", "metric": "knn_top1", "value": 50.0, "std": None,
         "runs": None, "source": "a paper", "table": "demo", "eval_recipe": None, "label": "demo row", "note": ""}


def _write(tmp_path, entries) -> str:
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump({"rows": entries}, sort_keys=False))
    return str(path)


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"vaule": 1.0}, "vaule", "unknown field"),
    ({"std": "drop"}, "std", "missing field"),
    ({"metric": "top1_linear"}, "metric", "unknown metric"),
    ({"protocol": "probe"}, "protocol", "unknown protocol"),
    ({"value": "high"}, "value", "must be a number"),
    ({"runs": 2.5}, "runs", "integer"),
    ({"eval_recipe": "cifar10/simclr_r18_500ep"}, "eval_recipe", "linear/<name>"),
])
def test_a_malformed_entry_names_the_entry_and_the_field(tmp_path, change, field, words) -> None:
    bad = {k: v for k, v in {**VALID, **change}.items() if v != "drop"}
    path = _write(tmp_path, [VALID | {"id": "demo/r18/ok"}, bad])
    with pytest.raises(ContrastlabError) as info:
        load_rows(path)
    message = str(info.value)
    assert path in message and "entry 1 ('demo/r18/x')" in message and f"'{field}'" in message and words in message


def test_duplicate_ids_and_a_wrong_layout_are_refused(tmp_path) -> None:
    assert [r.id for r in load_rows(_write(tmp_path, [VALID]))] == ["demo/r18/x"]
    with pytest.raises(ContrastlabError, match=r"entry 1 \('demo/r18/x'\): field 'id'.*already entry 0"):
        load_rows(_write(tmp_path, [VALID, VALID]))
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([VALID]))
    with pytest.raises(ContrastlabError, match="one key, 'rows:'"):
        load_rows(path)
    assert set(VALID) == set(FIELDS)  # the fixture holds every field, so each case above changes exactly one
