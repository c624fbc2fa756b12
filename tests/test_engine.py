"""Engine pieces against explicit formulas: schedules, LARS, checkpoints, kNN, linear probe."""

from __future__ import annotations

import hashlib
import io
import math
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from contrastlab.config.schema import LinearConfig, OptimConfig
from contrastlab.engine.checkpoint import (
    FORMAT,
    atomic_save,
    load_backbone_weights,
    load_checkpoint,
    newest_intact_checkpoint,
    remove_checkpoint,
)
from contrastlab.engine.optim import LARS, build_optimizer, set_learning_rate
from contrastlab.engine.schedules import ema_momentum, learning_rate
from contrastlab.errors import CheckpointError, ConfigError
from contrastlab.eval.knn import knn_predict
from contrastlab.eval.linear import linear_probe, state_fingerprint


def test_warmup_cosine_schedule_matches_formula():
    base, total, warm = 0.8, 1000, 100
    for step in [0, 1, 50, 99]:
        assert learning_rate(step, base_lr=base, total_steps=total, warmup_steps=warm) == pytest.approx(base * step / warm)
    for step in [100, 300, 550, 999, 1000]:
        expected = 0.5 * base * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert learning_rate(step, base_lr=base, total_steps=total, warmup_steps=warm) == pytest.approx(expected)
    assert learning_rate(10, base_lr=1.0, total_steps=100, schedule="step", milestones_steps=(5, 8)) == pytest.approx(0.01)
    assert learning_rate(6, base_lr=1.0, total_steps=100, schedule="step", milestones_steps=(5, 8)) == pytest.approx(0.1)
    assert learning_rate(60, base_lr=0.3, total_steps=100, schedule="constant") == 0.3
    with pytest.raises(ConfigError):
        learning_rate(0, base_lr=1, total_steps=1, schedule="poly")


def test_byol_momentum_schedule():
    assert ema_momentum(0, base=0.996, total_steps=100, schedule="cosine") == pytest.approx(0.996)
    assert ema_momentum(100, base=0.996, total_steps=100, schedule="cosine") == pytest.approx(1.0)
    assert ema_momentum(50, base=0.996, total_steps=100, schedule="cosine") == pytest.approx(0.998)
    assert ema_momentum(37, base=0.99, total_steps=100) == 0.99


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w.grad, b.grad = gw.clone(), gb.clone()
    lr, wd, eta = 0.5, 0.01, 0.001
    opt = LARS([{"params": [w]}, {"params": [b], "exclude_from_lars": True}], lr=lr, weight_decay=wd,
               momentum=0.9, trust_coefficient=eta)
    opt.step()
    d = gw + wd * w0
    ratio = eta * w0.norm() / d.norm()
    assert torch.allclose(w.detach(), w0 - lr * ratio * d, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - lr * gb, atol=1e-6)  # 1-D: no wd, no trust ratio
    # second step uses momentum: buf = 0.9 * buf + update
    w.grad, b.grad = gw.clone(), gb.clone()
    w1 = w.detach().clone()
    opt.step()
    d1 = gw + wd * w1
    buf = 0.9 * (ratio * d) + eta * w1.norm() / d1.norm() * d1
    assert torch.allclose(w.detach(), w1 - lr * buf, atol=1e-6)


def test_optimizer_groups_fixed_lr_and_weight_decay_split():
    lin = nn.Linear(3, 2)
    pred = nn.Linear(2, 2)
    cfg = OptimConfig(name="sgd", exclude_bias_bn_wd=True, weight_decay=0.1)
    opt = build_optimizer([{"params": list(lin.parameters())},
                           {"params": list(pred.parameters()), "fixed_lr": True}], cfg, lr=1.0)
    set_learning_rate(opt, 0.25, peak_lr=1.0)
    by_fixed = {(g["fixed_lr"], g["params"][0].ndim): g for g in opt.param_groups}
    assert by_fixed[(False, 2)]["lr"] == 0.25 and by_fixed[(True, 2)]["lr"] == 1.0
    assert by_fixed[(False, 1)]["weight_decay"] == 0.0 and by_fixed[(False, 2)]["weight_decay"] == 0.1
    with pytest.raises(ConfigError):
        build_optimizer([{"params": list(lin.parameters())}], OptimConfig(name="rmsprop"), lr=1.0)


def test_checkpoint_atomic_and_errors(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    net = nn.Linear(3, 2)
    atomic_save({"format": FORMAT, "method": {f"backbone.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.sha256"]  # no temp file left
    # the checksum hashed while streaming is the file's own, and the file is what torch.save makes in memory
    recorded = (tmp_path / "ck" / "last.pt.sha256").read_text().split()
    assert recorded == [hashlib.sha256(path.read_bytes()).hexdigest(), "last.pt"]
    buffer = io.BytesIO()
    torch.save(torch.load(path, weights_only=False), buffer)
    assert buffer.getvalue() == path.read_bytes()
    ck = load_checkpoint(path)
    other = nn.Linear(3, 2)
    load_backbone_weights(other, ck)
    assert torch.equal(other.weight, net.weight)
    with pytest.raises(CheckpointError, match="do not match"):
        load_backbone_weights(nn.Linear(4, 2), ck)
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not written by contrastlab"):
        load_checkpoint(foreign)


_SAVE_PAST_A_FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from contrastlab.engine.checkpoint import FORMAT, atomic_save
from contrastlab.errors import CheckpointError
path = sys.argv[1]
atomic_save({"format": FORMAT, "epoch": 1, "method": {"w": torch.ones(1000)}}, path)  # small: fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    atomic_save({"format": FORMAT, "epoch": 2, "method": {"w": torch.ones(1 << 20)}}, path)  # 4 MB: does not
except CheckpointError as exc:
    print(exc)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_the_old_one_survives(tmp_path):
    """A real failed write (the OS refuses bytes past a file-size limit, as a full disk does) mid-stream."""
    path = tmp_path / "last.pt"
    done = subprocess.run([sys.executable, "-c", _SAVE_PAST_A_FILE_SIZE_LIMIT, str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"could not write checkpoint {path} (File too large; it needs about 4 MB" in done.stdout
    assert "previous checkpoint there, if any, is unchanged" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]  # no temp file left
    assert load_checkpoint(path)["epoch"] == 1


def _save_linear(path, epoch: int) -> None:
    atomic_save({"format": FORMAT, "epoch": epoch, "method": {"backbone.w": torch.full((3,), float(epoch))}}, path)


def test_checksum_detects_a_damaged_checkpoint_and_auto_resume_falls_back(tmp_path):
    folder = tmp_path / "checkpoints"
    for epoch in (1, 2, 3):
        _save_linear(folder / f"epoch_{epoch:04d}.pt", epoch)
    _save_linear(folder / "last.pt", 3)
    assert newest_intact_checkpoint(folder) == folder / "last.pt"
    for name in ("last.pt", "epoch_0003.pt"):  # flip one byte in the middle: still a readable zip, wrong data
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder / "last.pt")
    messages: list[str] = []
    found = newest_intact_checkpoint(folder, log=messages.append)
    assert found == folder / "epoch_0002.pt" and load_checkpoint(found)["epoch"] == 2
    assert any("last.pt" in m for m in messages) and any("epoch_0003.pt" in m for m in messages)
    remove_checkpoint(folder / "epoch_0001.pt")
    assert not (folder / "epoch_0001.pt").exists() and not (folder / "epoch_0001.pt.sha256").exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "last.pt"
    _save_linear(path, 1)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        _save_linear(path, 2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # intact and still matching its checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_knn_matches_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(60, 5, generator=g), torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(25, 5, generator=g)
    k, t = 7, 0.2
    pred = knn_predict(queries, bank, labels, num_classes=4, k=k, temperature=t, chunk_size=8)
    for i in range(25):
        q = queries[i] / queries[i].norm()
        sims = [(float(q @ (bank[j] / bank[j].norm())), j) for j in range(60)]
        sims.sort(reverse=True)
        votes = [0.0] * 4
        for s, j in sims[:k]:
            votes[int(labels[j])] += math.exp(s / t)
        assert int(pred[i]) == max(range(4), key=lambda c: votes[c])


def test_linear_probe_learns_and_leaves_backbone_unchanged():
    torch.manual_seed(0)
    # two well separated classes in input space; a frozen random linear+BN backbone keeps them separable
    x = torch.cat([torch.randn(64, 6) + 3, torch.randn(64, 6) - 3])
    y = torch.cat([torch.zeros(64), torch.ones(64)]).long()
    backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
    backbone.train()(torch.randn(32, 6))  # give BN non-trivial running statistics
    before = state_fingerprint(backbone)
    ds = TensorDataset(x, y, torch.arange(128))
    cfg = LinearConfig(epochs=5, batch_size=32, lr=0.5, augment=False, schedule="cosine")
    result = linear_probe(backbone, 8, 2, ds, ds, cfg, log=lambda s: None)
    assert result["backbone_unchanged"] and state_fingerprint(backbone) == before
    assert result["top1"] > 95.0
    assert result["reported_epoch"] == 5


# --- what the methods beyond InfoNCE need from the engine (issue 25) ----------------------------------------------

def test_gradients_are_clipped_globally_or_per_parameter():
    from contrastlab.engine.gradients import clip_gradients

    torch.manual_seed(0)
    grads = [torch.randn(4, 3) * 5, torch.randn(7) * 0.01, torch.randn(2, 2) * 2]
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients(params, 1.0, "per_parameter")
    for p, g in zip(params, grads):  # DINO's rule, parameter by parameter
        norm = float(g.norm())
        expected = g * (1.0 / (norm + 1e-6)) if 1.0 / (norm + 1e-6) < 1 else g
        torch.testing.assert_close(p.grad, expected)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients(params, 1.0, "global")
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (1.0 / (total + 1e-6)))


def test_weight_decay_schedule_bias_lr_scale_and_the_hook_before_the_optimiser_step(tmp_path):
    import math

    from contrastlab.config.load import load_config
    from contrastlab.engine.trainer import Trainer
    from contrastlab.methods import SimCLR
    from contrastlab.models import build_backbone

    seen: list[int] = []

    class FrozenProjectorEnd(SimCLR):
        """Drops the last projector layer's gradients, as DINO freezes its last layer."""

        name = "frozen_end_test"

        def before_optimizer_step(self, step):
            seen.append(step)
            for p in self.projector[-1].parameters():
                p.grad = None

    net, dim = build_backbone("resnet20", width=0.25)
    method = FrozenProjectorEnd(net, dim, proj_hidden_dim=16, proj_out_dim=8)
    frozen = [p.detach().clone() for p in method.projector[-1].parameters()]
    first_conv = method.backbone.conv1.weight.detach().clone() if hasattr(method.backbone, "conv1") else None
    cfg = load_config("demo", [f"out={tmp_path}", "data.subset=24", "data.batch_size=8", "data.workers=0",
                               "data.image_size=16", "train.device=cpu", "train.epochs=1", "monitor.max_bank=16",
                               "monitor.max_test=8", "monitor.knn_k=3", "observers=[progress]", "optim.name=lars",
                               "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.bias_bn_lr_scale=0.024",
                               "optim.warmup_epochs=0", "optim.schedule=constant"])
    trainer = Trainer(cfg, method=method, quiet=True)
    trainer.run()
    steps = trainer.d.total_steps
    assert seen == list(range(steps)) and steps == 3
    for p, before in zip(method.projector[-1].parameters(), frozen):
        assert torch.equal(p.detach(), before)  # its gradients were dropped every step
    if first_conv is not None:
        assert not torch.equal(method.backbone.conv1.weight.detach(), first_conv)
    last = steps - 1  # the last step's weight decay: DINO's cosine_scheduler, written out here
    expected_wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * last / steps))
    lr = trainer.d.lr
    for group in trainer.optimizer.param_groups:
        one_d = all(p.ndim <= 1 for p in group["params"])
        assert group["lr"] == pytest.approx(lr * (0.024 if one_d else 1.0))
        assert group["weight_decay"] == pytest.approx(expected_wd)


def test_rank_local_buffers_are_saved_per_rank_and_given_back(tmp_path):
    from contrastlab.config.load import load_config
    from contrastlab.engine.checkpoint import load_checkpoint
    from contrastlab.engine.trainer import train
    from contrastlab.methods import SimCLR
    from contrastlab.models import build_backbone

    class Counting(SimCLR):
        """Counts its steps in a buffer that would differ per rank (as SwAV's queue does)."""

        name = "counting_test"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("seen", torch.zeros(()))

        def rank_local_buffers(self):
            return ["seen"]

        def ddp_ignored_buffers(self):
            return ["seen"]

        def after_optimizer_step(self, momentum):
            self.seen += 1

    def fresh():
        torch.manual_seed(0)
        net, dim = build_backbone("resnet20", width=0.25)
        return Counting(net, dim, proj_hidden_dim=16, proj_out_dim=8)

    base = [f"out={tmp_path}", "data.subset=24", "data.batch_size=8", "data.workers=0", "data.image_size=16",
            "train.device=cpu", "monitor.max_bank=16", "monitor.max_test=8", "monitor.knn_k=3", "observers=[progress]"]
    train(load_config("demo", [*base, "train.epochs=1"]), method=fresh(), quiet=True)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert [float(r["seen"]) for r in ckpt["rank_local"]] == [3.0]  # one rank, its own copy
    resumed = fresh()
    train(load_config("demo", [*base, "train.epochs=2", "resume=auto"]), method=resumed, quiet=True)
    assert float(resumed.seen) == 6.0  # continued from the saved 3, not from 0
