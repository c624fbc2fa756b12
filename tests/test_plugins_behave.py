"""Plug-ins behave as their authors expect (issue 23, part 4): plug-in files found and recorded so a run directory
works from anywhere, a method's wrong output named at once, registration without traps, the configuration that
runs shown whole, objects given in Python recorded, and results that say what they measured."""

from __future__ import annotations

import json

import pytest
import yaml

import contrastlab
from contrastlab.cli import main
from contrastlab.config.load import load_config
from contrastlab.engine.trainer import train
from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.registry import METHODS, OBSERVERS

TINY = ["data.subset=24", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
        "model.width=0.25", "monitor.max_bank=24", "monitor.max_test=16", "monitor.knn_k=5",
        "observers=[progress,knn,test_accuracy,localiser]", "train.epochs=1", "train.max_steps=2"]

BARLOW = '''
import contrastlab
from helpers import barlow_loss  # a helper module beside the plug-in file


@contrastlab.register_method("barlow_test")
class Barlow(contrastlab.Method):
    def __init__(self, backbone, feature_dim, proj_out_dim: int = 24, lambd: float = 0.005):
        super().__init__(backbone, feature_dim)
        self.projector = contrastlab.models.heads.build_mlp(feature_dim, 32, proj_out_dim, 2)
        self.lambd = lambd

    def forward(self, views, labels, index):
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        return contrastlab.StepOutput(loss=barlow_loss(z1, z2, self.lambd))
'''
HELPERS = '''
def barlow_loss(z1, z2, lambd):
    z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = z1.T @ z2 / z1.shape[0]
    return (c.diagonal() - 1).pow(2).sum() + lambd * (c.pow(2).sum() - c.diagonal().pow(2).sum())
'''


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    """A folder holding a method plug-in that imports a helper beside it, and a recipe naming it relatively."""
    import sys

    folder = tmp_path / "lab"
    folder.mkdir()
    (folder / "barlow.py").write_text(BARLOW)
    (folder / "helpers.py").write_text(HELPERS)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"base": "demo", "plugins": ["barlow.py"],
                                                        "method": {"name": "barlow_test"}}))
    yield folder
    METHODS.unregister("barlow_test")
    for name in [n for n in sys.modules if n.startswith("contrastlab_plugin_") or n == "helpers"]:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])


def test_plugin_paths_resolve_and_the_run_directory_works_from_anywhere(plugin_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    # a recipe's relative plug-in path is read against the recipe's folder, and its helper module imports
    assert main(["train", str(plugin_folder / "recipe.yaml"), f"out={out}", *TINY]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["plugins"] == [str(plugin_folder / "barlow.py")]
    # an override's relative path is read against the current folder
    monkeypatch.chdir(plugin_folder)
    assert load_config("demo", ["plugins=[barlow.py]"]).plugins == [str(plugin_folder / "barlow.py")]
    # evaluating the run from another folder finds the plug-in
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "knn", str(out / "checkpoints" / "last.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["knn_top1"] >= 0


def test_a_file_imported_in_python_and_listed_in_plugins_is_one_registration(plugin_folder, monkeypatch):
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(plugin_folder))
    module = importlib.import_module("barlow")  # as a notebook would
    try:
        cfg = load_config("demo", [f"plugins=[{plugin_folder / 'barlow.py'}]", "method.name=barlow_test"])
        assert METHODS["barlow_test"] is module.Barlow and cfg.method.name == "barlow_test"
        # the same definition run again (a notebook cell run twice) replaces it; another one is refused
        importlib.reload(module)  # the same file run again
        with pytest.raises(ConfigError, match="registered already"):
            contrastlab.register_method("barlow_test", type("Other", (contrastlab.Method,), {}))
    finally:
        del sys.modules["barlow"]


def test_a_method_returning_the_wrong_type_is_named_at_the_first_step(tmp_path):
    class WrongOutput(contrastlab.Method):
        name = "wrong_output"

        def forward(self, views, labels, index):
            return self.backbone(views[0]).sum()  # a Tensor, not a StepOutput

    net, dim = contrastlab.build_backbone("resnet20", width=0.25)
    cfg = load_config("demo", [f"out={tmp_path / 'run'}", *TINY])
    with pytest.raises(ContrastlabError, match=r"WrongOutput.forward.*returned a torch.Tensor.*must return "
                                               r"contrastlab.StepOutput"):
        train(cfg, method=WrongOutput(net, dim), quiet=True)

    class VectorLoss(WrongOutput):
        def forward(self, views, labels, index):
            return contrastlab.StepOutput(loss=self.backbone(views[0]).sum(1))

    with pytest.raises(ContrastlabError, match=r"loss is a tensor of shape \[8\].*0-dim"):
        train(load_config("demo", [f"out={tmp_path / 'run2'}", *TINY]), method=VectorLoss(net, dim), quiet=True)


def test_registration_traps(tmp_path):
    class Unnamed(contrastlab.Method):  # inherits Method's name
        pass

    with pytest.raises(ConfigError, match="has no `name` of its own"):
        contrastlab.register_method()(Unnamed)
    assert "method" not in METHODS

    class Steps(contrastlab.Observer):  # a class registered by name, with a constructor taking nothing
        def __init__(self):
            self.steps = 0

        def on_step_end(self, run, output):
            assert output.loss.grad_fn is None and not output.loss.requires_grad  # detached, as documented
            self.steps += 1

        def on_finish(self, run, results):
            results["steps_seen"] = self.steps

    contrastlab.register_observer("steps_seen_test")(Steps)
    try:
        results = train(load_config("demo", [f"out={tmp_path / 'run'}", *TINY, "observers+=[steps_seen_test]"]),
                        quiet=True)
        assert results["steps_seen"] == 2 and "knn_top1" in results  # added to the recipe's list, not replacing it
    finally:
        OBSERVERS.unregister("steps_seen_test")
    with pytest.raises(ConfigError, match=r"\+= appends a list to a list key"):
        load_config("demo", ["seed+=[1]"])


def test_show_prints_what_runs_and_the_switch_is_said(capsys, tmp_path):
    assert main(["train", "demo", "--show", "method.name=byol"]) == 0
    shown = capsys.readouterr().out
    tree = yaml.safe_load(shown)
    from contrastlab.methods import method_kwargs

    defaults = {k: p.default for k, p in method_kwargs("byol").items() if isinstance(p.default, (int, float, str))}
    assert defaults and all(tree["method"][k] == v for k, v in defaults.items())  # the constructor's own defaults
    assert tree["method"]["proj_hidden_dim"] == 4096  # not the demo's SimCLR 256
    assert shown.startswith("# the overrides switch method.name from 'simclr' to 'byol': dropped the inherited")
    # the same note in the run's log, and the saved config rebuilds the same run
    capsys.readouterr()
    assert main(["train", "demo", f"out={tmp_path / 'run'}", *TINY, "method.name=byol"]) == 0
    assert "config: the overrides switch method.name from 'simclr' to 'byol'" in capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == tree["method"]


def test_every_method_saves_a_config_that_loads_again(tmp_path):
    for name in METHODS.names():
        cfg = load_config("demo", [f"method.name={name}"])
        text = contrastlab.config.load.dump_config(cfg)
        (tmp_path / "c.yaml").write_text(text)
        assert contrastlab.config.load.dump_config(load_config(str(tmp_path / "c.yaml"))) == text, name


def test_a_run_trained_with_a_given_method_is_recorded_and_its_resume_is_refused_without_it(tmp_path):
    net, dim = contrastlab.build_backbone("resnet20", width=0.25)
    method = contrastlab.build_method("byol", net, dim, proj_hidden_dim=16, proj_out_dim=8, pred_hidden_dim=16)
    out = tmp_path / "run"
    train(load_config("demo", [f"out={out}", *TINY]), method=method, quiet=True)
    assert (out / "config.yaml").read_text().startswith("# method: an object given in Python (contrastlab.methods.byol.BYOL)")
    assert json.loads((out / "run.json").read_text())["objects"] == {"method": "contrastlab.methods.byol.BYOL"}
    resumed = load_config("demo", [f"out={out}", *TINY[:-1], "train.max_steps=3", "resume=auto"])
    with pytest.raises(ContrastlabError, match=r"trained with objects given in Python \(method=contrastlab.methods."
                                               r"byol.BYOL\(...\)\).*resume it from Python with the same objects"):
        train(resumed, quiet=True)
    assert train(resumed, method=method, quiet=True)["steps"] == 3
    other = contrastlab.build_method("simclr", *contrastlab.build_backbone("resnet20", width=0.25))
    with pytest.raises(ContrastlabError, match=r"trained with method contrastlab.methods.byol.BYOL, but this run "
                                               r"builds contrastlab.methods.simclr.SimCLR"):
        train(load_config("demo", [f"out={out}", *TINY[:-1], "train.max_steps=4", "resume=auto"]), method=other,
              quiet=True)


def test_results_say_what_they_measured(tmp_path):
    trace = []

    class LastLoss(contrastlab.Observer):
        def on_step_end(self, run, output):
            trace.append(float(output.loss))

    results = train(load_config("demo", [f"out={tmp_path / 'run'}", *TINY, "monitor.max_bank=20",
                                         "monitor.knn_k=50", "train.max_steps=3"]), observers=[LastLoss()], quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert results["final_loss"] == records[-1]["loss"] == pytest.approx(sum(trace) / 3)
    assert results["last_step_loss"] == pytest.approx(trace[-1])
    assert "mean" in results["final_loss_is"]
    assert results["knn_k"] == results["knn_bank_size"] == 20 and results["knn_k_asked"] == 50


def test_checkpoint_state_of_a_plugin_observer_must_be_plain(tmp_path):
    class Arrays(contrastlab.Observer):
        def state_dict(self):
            import numpy as np

            return {"table": np.zeros(2)}

    with pytest.raises(contrastlab.CheckpointError, match=r"\['observers'\]\['Arrays'\]\['table'\] holds a numpy"):
        train(load_config("demo", [f"out={tmp_path / 'run'}", *TINY]), observers=[Arrays()], quiet=True)
