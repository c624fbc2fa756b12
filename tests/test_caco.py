"""CaCo: the closed-form memory gradient against autograd, the method's wiring, schedules, LARC, training.

Reference computations here are independent of the code under test: memory gradients come from autograd of
a surrogate whose per-entry signs are the specification's (negatives ascend, the assigned positive descends),
losses from plain cross-entropies of the encoders' outputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from contrastlab.config.load import load_config
from contrastlab.data.subsets import class_balanced_subset
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.engine.optim import LARC
from contrastlab.engine.schedules import ema_momentum, epoch_learning_rate
from contrastlab.engine.trainer import train
from contrastlab.errors import ConfigError
from contrastlab.memory import LearnableMemory, memory_gradient
from contrastlab.methods import CaCo
from contrastlab.methods.caco import memory_learning_rate
from contrastlab.models import build_backbone
from contrastlab.observers.knn_monitor import CollapseError

torch.set_num_threads(2)
B, D, K, TAU_M = 6, 5, 12, 0.3


def _problem(seed: int = 0, positives: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(D, K, generator=g, dtype=torch.float64) * 1.7
    y = torch.randint(0, K, (B,), generator=g) if positives is None else positives
    return q, w, y


def _mem_loss(q: torch.Tensor, w: torch.Tensor, y: torch.Tensor, tau: float = TAU_M) -> torch.Tensor:
    return F.cross_entropy(q @ F.normalize(w, dim=0) / tau, y)


def _signed_autograd(q: torch.Tensor, w: torch.Tensor, y: torch.Tensor, tau: float = TAU_M) -> torch.Tensor:
    """The memory's update direction by autograd: d/dW of sum_nj s_nj * dL/dz_nj * z_nj(W), with s = -1 on
    negative entries (ascent) and +1 on the assigned positive (descent), dL/dz held constant."""
    w = w.clone().requires_grad_(True)
    z = q @ F.normalize(w, dim=0) / tau
    onehot = F.one_hot(y, w.shape[1]).to(z.dtype)
    dl_dz = ((torch.softmax(z, dim=1) - onehot) / q.shape[0]).detach()
    sign = torch.where(onehot.bool(), 1.0, -1.0).to(z.dtype)
    (grad,) = torch.autograd.grad((sign * dl_dz * z).sum(), w)
    return grad


def _closed_form(q, w, y, tau: float = TAU_M) -> torch.Tensor:
    w_hat = F.normalize(w, dim=0)
    return memory_gradient(q, q @ w_hat, y, w_hat, w.norm(dim=0), tau)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_gradient_equals_signed_autograd(seed):
    q, w, y = _problem(seed)
    y[1] = y[0]  # a column that is the positive of two queries
    torch.testing.assert_close(_closed_form(q, w, y), _signed_autograd(q, w, y), rtol=1e-10, atol=1e-12)


def test_memory_gradient_per_column_formula_and_view_sum():
    q, w, y = _problem(3)
    w_hat, norms = F.normalize(w, dim=0), w.norm(dim=0)
    s = q @ w_hat
    p = torch.softmax(s / TAU_M, dim=1)
    expected = torch.zeros(D, K, dtype=torch.float64)
    for j in range(K):  # -(1/(tau_m |w_j|)) (1/B) sum_n |P_nj - 1[j = y_n]| (q_n - S_nj w_hat_j)
        for n in range(B):
            a = abs(float(p[n, j]) - float(j == y[n]))
            expected[:, j] -= a * (q[n] - s[n, j] * w_hat[:, j]) / (TAU_M * norms[j] * B)
    torch.testing.assert_close(_closed_form(q, w, y), expected, rtol=1e-10, atol=1e-12)
    # two views add
    q2, _, y2 = _problem(4)
    both = _closed_form(q, w, y) + _closed_form(q2, w, y2)
    torch.testing.assert_close(both, _signed_autograd(q, w, y) + _signed_autograd(q2, w, y2))


def test_a_memory_step_raises_the_loss_on_negatives_and_lowers_it_on_the_positive():
    q, w, _ = _problem(5)
    y = torch.full((B,), 2)  # column 2 is every query's positive; column 7 is nobody's
    g = _closed_form(q, w, y)
    before = _mem_loss(q, w, y)
    for column, direction in ((7, 1), (2, -1)):
        w_new = w.clone()
        w_new[:, column] -= 1e-3 * g[:, column]
        change = float(_mem_loss(q, w_new, y) - before)
        assert change * direction > 0, (column, change)


def test_learnable_memory_step_momentum_and_write():
    torch.manual_seed(0)
    memory = LearnableMemory(dim=3, size=8, momentum=0.9)
    w0 = memory.weight.clone()
    g1, g2 = torch.randn(3, 8), torch.randn(3, 8)
    memory.step(g1, lr=2.0)
    memory.step(g2, lr=0.5)
    v1 = g1
    v2 = 0.9 * v1 + g2
    torch.testing.assert_close(memory.velocity, v2)
    torch.testing.assert_close(memory.weight, w0 - 2.0 * v1 - 0.5 * v2)
    keys = torch.randn(5, 3)
    assert memory.write(keys, 6) == 2  # stops at K
    torch.testing.assert_close(memory.weight[:, 6:], keys[:2].T)
    with pytest.raises(ConfigError):
        LearnableMemory(dim=3, size=8, momentum=1.0)


# --- the method ---------------------------------------------------------------------------------------------

S = 16


def _caco(memory_size: int = 32, **kw) -> CaCo:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    kw = {"proj_hidden_dim": 16, "proj_out_dim": 8, "memory_size": memory_size, "temperature": 0.2,
          "memory_temperature": 0.25, "warm_start": False, **kw}
    return CaCo(net, dim, **kw)


def _views(n: int, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [S, S] + [8] * (n - 2)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def _encode(method: CaCo, views: list[torch.Tensor]):
    with torch.no_grad():
        q = [F.normalize(method.projector(method.backbone(v)), dim=1).double() for v in views]
        k = [F.normalize(method.key_encoder(v), dim=1).double() for v in views[:2]]
    return q, k


def test_two_view_step_matches_the_specification():
    method = _caco()
    views = _views(2)
    w = method.memory.weight.double().clone()
    out = method(views, None, None)
    q, k = _encode(method, views)
    w_hat = F.normalize(w, dim=0)
    y1, y2 = (k[1] @ w_hat).argmax(1), (k[0] @ w_hat).argmax(1)  # the other view's key picks the positive
    expected = F.cross_entropy(q[0] @ w_hat / 0.2, y1) + F.cross_entropy(q[1] @ w_hat / 0.2, y2)  # summed
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    g = _signed_autograd(q[0], w, y1, 0.25) + _signed_autograd(q[1], w, y2, 0.25)
    torch.testing.assert_close(method._pending_gradient.double(), g, rtol=1e-4, atol=1e-6)
    # the memory moves only after the optimiser step, by lr * g (first momentum step)
    torch.testing.assert_close(method.memory.weight.double(), w)
    method.memory_lr = 0.7
    method.after_optimizer_step(0.99)
    torch.testing.assert_close(method.memory.weight.double(), w - 0.7 * g, rtol=1e-4, atol=1e-6)
    assert out.outputs["pos_logits"].shape == (8,) and out.outputs["neg_logits"].shape == (8, 31)
    assert {"memory_index_acc", "positive_prob_tau_m", "memory_norm_mean"} <= set(out.parts)


def test_multicrop_wiring_queries_keys_and_averaging():
    method = _caco()
    views = _views(8)
    seen_by_keys: list[torch.Tensor] = []
    method.key_encoder.register_forward_hook(lambda m, inp, out: seen_by_keys.append(inp[0]))
    seen_by_online: list[torch.Tensor] = []
    method.backbone.register_forward_hook(lambda m, inp, out: seen_by_online.append(inp[0]))
    w = method.memory.weight.double().clone()
    out = method(views, None, None)
    assert len(seen_by_online) == 8 and all(a is b for a, b in zip(seen_by_online, views))
    assert len(seen_by_keys) == 2 and seen_by_keys[0] is views[0] and seen_by_keys[1] is views[1]
    q, k = _encode(method, views)
    w_hat = F.normalize(w, dim=0)
    y = [(kk @ w_hat).argmax(1) for kk in k]
    big_pairs = [(0, 1), (1, 0)]
    mini_pairs = [(i, j) for i in range(2, 8) for j in range(2)]
    assert len(mini_pairs) == 12

    def mean_ce(pairs):
        return sum(F.cross_entropy(q[i] @ w_hat / 0.2, y[j]) for i, j in pairs) / len(pairs)

    assert out.loss.item() == pytest.approx((mean_ce(big_pairs) + mean_ce(mini_pairs)).item(), rel=1e-5)

    def mean_grad(pairs):
        return sum(_signed_autograd(q[i], w, y[j], 0.25) for i, j in pairs) / len(pairs)

    torch.testing.assert_close(method._pending_gradient.double(), mean_grad(big_pairs) + mean_grad(mini_pairs),
                               rtol=1e-4, atol=1e-6)


def test_warm_start_fills_consecutive_blocks_then_copies_the_key_encoder():
    method = _caco(memory_size=10, warm_start=True)
    assert method.warm_start_steps(global_batch=4) == 3
    initial = method.memory.weight.clone()
    opt = torch.optim.SGD(method.param_groups(), lr=0.5)
    written_keys = []
    for step in range(3):
        views = _views(2, seed=step)
        key_before = [p.clone() for p in method.key_encoder.parameters()]
        with torch.no_grad():
            k = F.normalize(method.key_encoder(views[1]), dim=1)
            q = F.normalize(method.projector(method.backbone(views[0])), dim=1)
            w_hat = F.normalize(method.memory.weight, dim=0)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ w_hat], dim=1) / 0.2
        out = method(views, None, None)
        assert out.loss.item() == pytest.approx(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).item(),
                                                rel=1e-5)
        written_keys.append(k)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(0.5)  # the scheduled momentum is ignored during the warm start
        if step < 2:  # EMA with the warm-start momentum 0.999, from the pre-step key and post-step online weights
            online_after = list(method.backbone.parameters()) + list(method.projector.parameters())
            for kb, ka, on in zip(key_before, method.key_encoder.parameters(), online_after):
                torch.testing.assert_close(ka, 0.999 * kb + 0.001 * on.detach())
    keys = torch.cat(written_keys)
    torch.testing.assert_close(method.memory.weight, keys[:10].T)  # columns 0-3, 4-7, 8-9
    assert int(method.memory_written) == 10 and not method.warming_up and method.warm_start_steps(4) == 0
    assert not torch.equal(method.memory.weight, initial)
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    for key_p, online_p in zip(method.key_encoder.parameters(), online):
        assert torch.equal(key_p, online_p)  # re-copied after the last warm-start step


# --- schedules and optimisers -------------------------------------------------------------------------------

def test_schedules_as_released():
    base, epochs, warm = 1.2, 200, 10
    for e in range(warm):
        assert epoch_learning_rate(e, base_lr=base, total_epochs=epochs, warmup_epochs=warm,
                                   final_lr=base / 100) == pytest.approx(base * (e + 1) / warm)
    assert epoch_learning_rate(warm, base_lr=base, total_epochs=epochs, warmup_epochs=warm,
                               final_lr=base / 100) == pytest.approx(base)
    last = epoch_learning_rate(epochs - 1, base_lr=base, total_epochs=epochs, warmup_epochs=warm, final_lr=base / 100)
    expected = base / 100 + 0.5 * (base - base / 100) * (1 + math.cos(math.pi * (epochs - 1 - warm) / (epochs - warm)))
    assert last == pytest.approx(expected) and last > base / 100
    assert epoch_learning_rate(epochs, base_lr=base, total_epochs=epochs, warmup_epochs=warm,
                               final_lr=base / 100) == pytest.approx(base / 100)
    # memory rate: warm-up then constant when memory_lr == memory_lr_final; cosine otherwise
    assert memory_learning_rate(0, epochs, base=3.0, final=3.0, warmup_epochs=warm) == pytest.approx(0.3)
    assert memory_learning_rate(9, epochs, base=3.0, final=3.0, warmup_epochs=warm) == pytest.approx(3.0)
    assert memory_learning_rate(150, epochs, base=3.0, final=3.0, warmup_epochs=warm) == 3.0
    mid = memory_learning_rate(105, epochs, base=3.0, final=0.03, warmup_epochs=warm)
    assert mid == pytest.approx(0.03 + 0.5 * 2.97 * (1 + math.cos(math.pi * 95 / 190)))
    assert memory_learning_rate(5.0, epochs, base=3.0, final=3.0, warmup_epochs=warm, per_epoch=False) == 1.5
    # key-encoder momentum: 0.99 cosine to 1 over the run
    total = epochs * 7
    assert ema_momentum(0, base=0.99, total_steps=total, schedule="cosine") == pytest.approx(0.99)
    assert ema_momentum(total, base=0.99, total_steps=total, schedule="cosine") == pytest.approx(1.0)
    e = 50
    assert ema_momentum(e * 7, base=0.99, total_steps=total, schedule="cosine") == pytest.approx(
        1 - 0.5 * (1 + math.cos(math.pi * e / epochs)) * 0.01)


def test_larc_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)  # zero norm: plain SGD step on the first update
    opt = LARC([w, b], lr=0.4, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    x = torch.randn(5, 4)
    (x @ w.T + b).pow(2).sum().backward()
    gw, gb, w0 = w.grad.clone(), b.grad.clone(), w.detach().clone()
    opt.step()
    rate = 0.001 * w0.norm() / (gw.norm() + w0.norm() * 0.01 + 1e-8)
    torch.testing.assert_close(w.detach(), w0 - 0.4 * (gw + 0.01 * w0) * rate)
    torch.testing.assert_close(b.detach(), -0.4 * gb)


def test_class_balanced_subset_takes_the_first_fraction_of_each_class():
    targets = [0] * 10 + [1] * 5 + [2] * 20 + [-1] * 3
    idx = class_balanced_subset(targets, 0.2)
    assert idx == [0, 1, 10, 15, 16, 17, 18]
    with pytest.raises(ConfigError):
        class_balanced_subset(targets, 0.0)


# --- training ---------------------------------------------------------------------------------------------

def _tiny(tmp_path, *extra):
    return load_config("cifar10/caco_r18_500ep", [
        f"out={tmp_path}", "data.name=demo", "data.root=null", "data.batch_size=16", "data.workers=0",
        "data.image_size=16", "train.device=cpu", "model.arch=resnet20", "model.width=0.25", "train.epochs=3",
        "monitor.knn_every=0", "monitor.max_bank=64", "monitor.max_test=32", "monitor.knn_k=5",
        "observers=[progress,knn,test_accuracy,localiser]", "train.log_every=1000", "method.proj_hidden_dim=32", "method.proj_out_dim=16",
        "method.memory_size=32", "optim.warmup_epochs=1", "method.memory_warmup_epochs=1", *extra,
    ])


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class _Killed(Exception):
    pass


def _interrupted_after_first_checkpoint(monkeypatch, cfg):
    """Run ``cfg`` and die right after the first ``last.pt`` is written (same config, unlike a shorter run)."""
    from contrastlab.engine import trainer

    original = trainer.atomic_save

    def save_then_die(obj, path):
        original(obj, path)
        raise _Killed

    monkeypatch.setattr(trainer, "atomic_save", save_then_die)
    with pytest.raises(_Killed):
        train(cfg, quiet=True)
    monkeypatch.setattr(trainer, "atomic_save", original)


def test_resume_restores_memory_buffer_optimizer_and_schedules(tmp_path, monkeypatch):
    from test_train import _Subset

    with _Subset(64):
        train(_tiny(tmp_path / "full"), quiet=True)
        _interrupted_after_first_checkpoint(monkeypatch, _tiny(tmp_path / "part"))
        assert [r["epoch"] for r in _records(tmp_path / "part")] == [1]
        train(_tiny(tmp_path / "part", "resume=auto"), quiet=True)
    full, part = _records(tmp_path / "full"), _records(tmp_path / "part")
    assert [r["epoch"] for r in part] == [1, 2, 3]
    assert [r["loss"] for r in part] == pytest.approx([r["loss"] for r in full], rel=1e-5)
    assert [r["lr"] for r in part] == pytest.approx([r["lr"] for r in full])
    assert [r["parts"]["memory_lr"] for r in part] == pytest.approx([r["parts"]["memory_lr"] for r in full])
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for key in ("memory.weight", "memory.velocity", "memory_written"):
        torch.testing.assert_close(a["method"][key], b["method"][key], rtol=1e-4, atol=1e-5)
    assert int(a["method"]["memory_written"]) == 32
    assert a["method"]["memory.velocity"].abs().sum() > 0
    # per-epoch schedules: warm-up (e+1)/1 then cosine to lr/100, memory lr 3.0 from the first epoch
    assert [r["parts"]["memory_lr"] for r in full] == pytest.approx([3.0, 3.0, 3.0])
    for r in full:
        assert {"memory_norm_mean", "memory_query_sim_mean", "memory_index_acc"} <= set(r["parts"])


def test_collapse_guard_stops_the_run_with_a_message(tmp_path):
    from test_train import _Subset

    with _Subset(32), pytest.raises(CollapseError, match="collapse_threshold"):
        train(_tiny(tmp_path, "train.epochs=2", "monitor.knn_every=1", "monitor.collapse_threshold=100",
                    "monitor.collapse_after_epoch=1"), quiet=True)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert [r["epoch"] for r in _records(tmp_path)] == [1]
