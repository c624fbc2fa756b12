"""The shipped table studies (``contrastlab/studies/files/<table>.yaml``): one study per published table whose rows
name a recipe, reproducing exactly those rows.

The expected row and cell counts, the seeds and the GPUs are written here from the published tables and the
sources' own training setups (the READMEs and scripts each study file cites), never computed from the study files:
rows that share one pre-training (linear and k-NN of a run, linear and fine-tuning, Acc@1 and Acc@5 of one probe, two
published values of one setting, the transfers of one network) are one group, so one run feeds all of them.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from contrastlab.cli import main
from contrastlab.config.load import load_config
from contrastlab.studies.published import tables
from contrastlab.studies.study import STUDY_FILES, Study, study_names

# table id -> (rows the study reproduces, cells = groups x seeds)
EXPECTED = {
    "mocov3_jointcrop_100ep": (2, 2),  # MoCo v3, + JointCrop(0)
    "mocov3_jointcrop_300ep": (2, 2),
    "mocov3_jointcrop_1000ep": (1, 1),  # MoCo v3 only: JointCrop's cell is "-"
    "mocov3_vit_300ep": (4, 2),  # ViT-S, ViT-B: linear and fine-tuning of one pre-training each
    "mocov3_vit_b_transfer": (4, 1),  # four transfers of one ViT-B
    "mcl_cifar100": (24, 24 * 3),  # 8 networks x 3 variants, 3 runs each
    "mcl_cifar100_kd": (10, 10 * 3),  # 5 networks x 2, 3 runs each
    "mcl_imagenet": (7, 7),
    "mcl_moco_imagenet": (2, 2 * 3),  # 3 runs each
    "caco_imagenet": (4, 4),
    "ft_imagenet_linear": (5, 5),
    "ft_voc_detection": (5, 5),
    "ft_coco_detection": (5, 5),
    "ft_imagenet100_linear": (1, 1),
    "solo_learn_cifar10": (8, 4),  # 4 methods: Acc@1 and Acc@5 of one probe
    "solo_learn_cifar100": (8, 4),
    "dino_imagenet": (6, 3),  # 3 lengths: linear and k-NN of one run
    "swav_imagenet": (7, 7),
    "barlow_twins_imagenet": (3, 2),  # README 73.5 and paper 73.2 are one 1000-epoch setting; the 300-epoch baseline
    "vicreg_imagenet": (1, 1),
}

# the published tables without a recipe (JointCrop's appendix states neither epochs nor batch): no study
NO_RECIPE = {"jointcrop_appendix_mocov1", "jointcrop_appendix_dino"}

# seeds per study where the source averages several runs ("with three runs", mean +- std); else one
SEEDS = {"mcl_cifar100": 3, "mcl_cifar100_kd": 3, "mcl_moco_imagenet": 3}

# GPUs a cell trains on (gpus per node x nodes), from each source's setup; per group where a table mixes setups
GPUS = {
    "mocov3_jointcrop_100ep": 16,  # moco-v3 CONFIG.md: ResNet-50 on 2 nodes, 16 GPUs; JointCrop README: the same
    "mocov3_jointcrop_300ep": 16,
    "mocov3_jointcrop_1000ep": 16,
    "mocov3_vit_300ep": {"vit_s": 32, "vit_b": 64},  # CONFIG.md: ViT-Small 4-node (32-GPU), ViT-Base 8-node (64-GPU)
    "mocov3_vit_b_transfer": 64,
    "mcl_cifar100": 1,  # MCL README: a single RTX 3090
    "mcl_cifar100_kd": 1,
    "mcl_imagenet": {"r18_baseline": 8, "r34_baseline": 8, "*": 1},  # torchvision's 8 V100s; MCL: a single V100
    "mcl_moco_imagenet": 8,  # MCL README: 8 RTX 3090s
    "caco_imagenet": {"r50_200ep_bs1024": 8, "*": 32},  # CaCo README: one 8-V100 machine; four of them
    "ft_imagenet_linear": 8,  # moco README: 8 V100s; torchvision: 8 V100s
    "ft_voc_detection": 8,
    "ft_coco_detection": 8,
    "ft_imagenet100_linear": 8,
    "solo_learn_cifar10": 1,  # solo-learn: devices [0]
    "solo_learn_cifar100": 1,
    "dino_imagenet": {"vit_s16_100ep": 8, "*": 16},  # DINO README: one node of 8 GPUs; 16 GPUs
    "swav_imagenet": {"r50_200ep_bs256": 4, "r50_400ep_bs256": 4, "*": 64},  # SwAV's sbatch scripts
    "barlow_twins_imagenet": 16,  # Barlow Twins README: 16 V100s
    "vicreg_imagenet": 32,  # VICReg README: 4 nodes x 8 GPUs
}

# the export each protocol outside contrastlab starts from (the rows' notes)
EXPORT = {"detection": "--format detectron2", "transfer": "--format timm"}

_LOAD_SECONDS: list[float] = []


@pytest.fixture(scope="module")
def studies() -> dict[str, Study]:
    """Every table study, loaded and validated (every group's config loaded with its overrides, every protocol
    recipe read); the time it takes is reported by test_loading_every_table_study_is_quick."""
    start = time.perf_counter()
    loaded = {name: Study.load(name) for name in EXPECTED}
    _LOAD_SECONDS.append(time.perf_counter() - start)
    return loaded


def _with_recipes(table: str) -> list:
    return [r for r in tables()[table] if r.recipes]


def test_every_table_with_recipes_ships_a_study():
    with_recipes = {name for name, items in tables().items() if any(r.recipes for r in items)}
    assert with_recipes == set(EXPECTED)
    assert set(tables()) == set(EXPECTED) | NO_RECIPE
    for name in NO_RECIPE:
        assert not any(r.recipes for r in tables()[name]) and not (STUDY_FILES / f"{name}.yaml").exists()
    assert set(study_names()) == set(EXPECTED) | {"demo", "base_methods_demo"}


def test_loading_every_table_study_is_quick(studies):
    assert len(studies) == len(EXPECTED) == 20
    assert _LOAD_SECONDS and _LOAD_SECONDS[0] < 60, _LOAD_SECONDS  # about 5 s here, most of it importing torch


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_table_study_reproduces_exactly_its_rows(studies, name):
    study = studies[name]
    rows, cells = EXPECTED[name]
    assert study.name == name
    published = [r.id for r in _with_recipes(name)]
    assert len(published) == len(study.reproduces) == rows
    assert sorted(study.reproduces) == sorted(published) and len(set(study.reproduces)) == rows
    assert len(study.cells()) == cells
    named = [row for group in study.groups for row in group.rows]
    assert Counter(named) == Counter(study.reproduces)  # every row in exactly one group


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_group_trains_the_recipe_its_rows_name_as_it_is(studies, name):
    study = studies[name]
    by_id = {r.id: r for r in tables()[name]}
    for group in study.groups:
        assert group.rows, group.name
        for row_id in group.rows:
            assert by_id[row_id].recipes == (group.recipe,), (group.name, row_id)
        assert group.overrides == ()
    recipes = [g.recipe for g in study.groups]
    assert len(recipes) == len(set(recipes)), "rows sharing a pre-training belong in one group"
    assert all(o.startswith("data.root=") for o in study.overrides), study.overrides  # where the data is, no more


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_evaluations_follow_each_rows_protocol(studies, name):
    study = studies[name]
    by_id = {r.id: r for r in tables()[name]}
    for group in study.groups:
        wanted = set()
        for row_id in group.rows:
            row = by_id[row_id]
            if row.protocol in ("linear", "finetune"):
                wanted.add((row.protocol, row.eval_recipe))  # None: the recipe's own linear: section
            elif row.protocol == "knn":
                wanted.add(("knn", None))
            else:  # supervised: the run's own test accuracy; detection, transfer: outside contrastlab
                assert row.protocol in ("supervised", "detection", "transfer"), row_id
        assert {(e.kind, e.recipe) for e in group.evaluate} == wanted, group.name
        assert len(group.evaluate) == len(wanted)


def test_knn_rows_use_the_whole_training_set_as_the_bank(studies):
    """DINO's eval_knn.py: k 20, T 0.07, every training image in the bank; the recipes' monitor caps the bank."""
    groups = [(study, g) for study in studies.values() for g in study.groups if any(e.kind == "knn" for e in g.evaluate)]
    assert {study.name for study, _ in groups} == {"dino_imagenet"} and len(groups) == 3
    for study, group in groups:
        (knn,) = [e for e in group.evaluate if e.kind == "knn"]
        cfg = load_config(group.recipe, list(knn.overrides))
        assert (cfg.monitor.knn_k, cfg.monitor.knn_temperature, cfg.monitor.max_bank) == (20, 0.07, 0)
        assert cfg.monitor.bank_fraction == 1.0 and cfg.model.evaluated_network == "momentum"  # the teacher
        assert not knn.from_training_run and load_config(group.recipe).monitor.max_bank > 0
        cell = study.cell(f"{group.name}__s0")
        assert cell.stage("knn").argv[-1] == "monitor.max_bank=0"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seeds_follow_the_published_run_counts(studies, name):
    study = studies[name]
    runs = {r.runs for r in _with_recipes(name)}
    assert len(runs) == 1, runs
    (count,) = runs
    assert len(study.seeds) == SEEDS.get(name, 1) == (count or 1)
    assert study.seeds == tuple(range(len(study.seeds)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_resources_follow_the_published_setups(studies, name):
    study = studies[name]
    expected = GPUS[name]
    for cell in study.cells():
        gpus = expected if isinstance(expected, int) else expected.get(cell.group, expected.get("*"))
        res = cell.resources
        assert res.gpus * res.nodes == gpus, (cell.id, res)
        assert res.gpus <= 8 and res.cpus >= 4 * res.gpus and re.fullmatch(r"\d\d:00:00", res.time), res
        train = cell.stage("train")
        assert (train.processes, train.nodes) == (max(1, res.gpus), res.nodes)
        command = train.command()
        if res.gpus > 1:
            assert command[2:5] == ["torch.distributed.run", "--nproc-per-node", str(res.gpus)]
            assert ("--nnodes" in command) == (res.nodes > 1)
        for stage in cell.stages[1:]:  # fine-tuning spreads as training does; a probe or kNN is one process
            spread = (train.processes, train.nodes) if stage.name == "finetune" else (1, 1)
            assert (stage.processes, stage.nodes) == spread, (cell.id, stage.name)


@pytest.mark.parametrize("protocol", sorted(EXPORT))
def test_a_protocol_outside_contrastlab_trains_and_names_its_export(studies, protocol):
    names = {r.table for items in tables().values() for r in items if r.protocol == protocol}
    assert names == ({"ft_voc_detection", "ft_coco_detection"} if protocol == "detection" else {"mocov3_vit_b_transfer"})
    for name in names:
        study = studies[name]
        assert all(g.evaluate == () for g in study.groups)
        assert "contrastlab export" in study.description and EXPORT[protocol] in study.description
        assert [s.name for c in study.cells() for s in c.stages] == ["train"] * len(study.cells())


def test_study_list_shows_every_table_study(capsys):
    assert main(["study", "list"]) == 0
    out = capsys.readouterr().out
    for name, (_, cells) in EXPECTED.items():
        assert re.search(rf"^{name}\s+{cells} cells  \S", out, re.MULTILINE), name
    starts = {line.index(" cells ") for line in out.splitlines()}
    assert len(starts) == 1  # the names column fits the longest name


def test_dry_run_prints_the_cells_and_what_sbatch_needs(tmp_path, capsys):
    folder = tmp_path / "vit"
    assert main(["study", "run", "mocov3_vit_300ep", "--dry-run", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "2 cells, 0 done; full runs" in out and not folder.exists()
    blocks = {b.split(" ", 1)[0]: b for b in out.split("\ncell ")[1:]}
    assert set(blocks) == {"vit_s__s0", "vit_b__s0"}
    for cell, nodes, size, finetune in (("vit_s__s0", 4, "s", "mocov3_vit_s_300ep"),
                                        ("vit_b__s0", 8, "b", "mocov3_vit_b_150ep")):
        block = blocks[cell]
        assert f"rows mocov3/vit_{size}_300ep/linear, mocov3/vit_{size}_300ep/finetune" in block
        assert f"resources: gpus 8, nodes {nodes}, cpus 80, time 72:00:00" in block
        assert f"--nproc-per-node 8 --nnodes {nodes}" in block and f"train imagenet/mocov3_vit_{size}_300ep" in block
        assert "eval linear" in block and "--recipe linear/mocov3_vit_90ep" in block
        assert re.search(rf"--nnodes {nodes} .* eval finetune .* --recipe finetune/{finetune} --resume auto", block)
