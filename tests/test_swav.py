"""SwAV (Caron et al., NeurIPS 2020): Sinkhorn-Knopp, swapped prediction, prototypes, queue, DDP and resume.

Every expected value is computed here, independently of contrastlab.objectives.swav: a Sinkhorn written with Python
loops, the swapped-prediction loss written term by term, the queue's contents from the embeddings of each step, the
release's settings read from facebookresearch/swav's scripts and vturrisi/solo-learn's cifar/swav.yaml.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_on_ranks

from contrastlab.config.derived import derive
from contrastlab.config.load import load_config
from contrastlab.engine.distributed import wrap_ddp
from contrastlab.errors import ConfigError
from contrastlab.methods import SwAV
from contrastlab.models import build_backbone
from contrastlab.models.multicrop import forward_by_resolution
from contrastlab.objectives import SwAVLoss, sinkhorn_knopp, swapped_prediction_loss

pytestmark = pytest.mark.usefixtures("one_thread")


# --- independent references ---------------------------------------------------------------------------------


def loop_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Algorithm of the paper's appendix A.1 with Python loops over every entry, in float64: ``[N, K] -> [N, K]``."""
    n, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / epsilon) for i in range(n)] for j in range(k)]  # q[prototype][sample]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            r = sum(q[j])
            q[j] = [v / r / k for v in q[j]]
        for i in range(n):
            c = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / c / n
    return torch.tensor([[q[j][i] * n for j in range(k)] for i in range(n)], dtype=torch.float64)


def formula_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], assign: list[int], t: float) -> torch.Tensor:
    """``1/|A| sum_a 1/(V-1) sum_{v != a} 1/B sum_b -sum_k q_a[b, k] log softmax(s_v[b] / t)_k``, term by term."""
    total = torch.zeros((), dtype=torch.float64)
    for a, q in zip(assign, codes):
        sub = torch.zeros((), dtype=torch.float64)
        for v, s in enumerate(scores):
            if v == a:
                continue
            for b in range(s.shape[0]):
                logits = s[b] / t
                log_p = logits - torch.log(torch.exp(logits).sum())
                sub = sub - (q[b] * log_p).sum() / s.shape[0]
        total = total + sub / (len(scores) - 1)
    return total / len(assign)


def _method(**kwargs) -> SwAV:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    options = {"proj_hidden_dim": 16, "proj_out_dim": 8, "num_prototypes": 6, **kwargs}
    return SwAV(net, dim, **options).double()


def _views(batch: int = 4, small: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
            + [torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(small)])


def _embeddings(method: SwAV, views: list[torch.Tensor]) -> torch.Tensor:
    """The normalised projections of every crop, encoded by resolution group as the release does."""
    feats = torch.cat([method.backbone(torch.cat(views[:2])), method.backbone(torch.cat(views[2:]))])
    return F.normalize(method.projector(feats), dim=1)


# --- Sinkhorn-Knopp ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon,iterations", [(0.05, 3), (0.5, 1), (0.01, 3), (0.3, 7)])
def test_sinkhorn_equals_a_loop_implementation_and_its_columns_are_codes(epsilon, iterations):
    g = torch.Generator().manual_seed(1)
    scores = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=1) @ F.normalize(
        torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1).t()  # cosines, as SwAV's
    codes = sinkhorn_knopp(scores, epsilon, iterations)
    torch.testing.assert_close(codes, loop_sinkhorn(scores, epsilon, iterations), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (codes >= 0).all()


def test_sinkhorn_converges_to_the_equipartition():
    """With many iterations, every prototype receives N / K of the N samples' mass (the paper's constraint)."""
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(12, 4, generator=g, dtype=torch.float64) * 2 - 1
    codes = sinkhorn_knopp(scores, 0.5, 500)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((4,), 12 / 4, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    # 3 iterations do not reach it: the rows are balanced only approximately (a check that can fail)
    assert not torch.allclose(sinkhorn_knopp(scores, 0.05, 3).sum(dim=0), codes.sum(dim=0), atol=1e-6)


def test_sinkhorn_is_permutation_equivariant_and_large_epsilon_is_uniform():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 5, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(sinkhorn_knopp(scores[perm], 0.1, 3), sinkhorn_knopp(scores, 0.1, 3)[perm])
    torch.testing.assert_close(sinkhorn_knopp(scores, 1e6, 3), torch.full((6, 5), 0.2, dtype=torch.float64),
                               rtol=0, atol=1e-5)


# --- the swapped prediction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_crops,assign", [(2, [0, 1]), (4, [0, 1]), (4, [0]), (5, [0, 1, 2])])
def test_swapped_prediction_equals_the_formula(num_crops, assign):
    g = torch.Generator().manual_seed(4)
    scores = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(num_crops)]
    codes = [torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1) for _ in assign]
    for t in (0.1, 1.0):
        got = swapped_prediction_loss(scores, codes, assign, t)
        torch.testing.assert_close(got, formula_loss(scores, codes, assign, t), rtol=1e-12, atol=0)
    # the whole loss: codes from the loop Sinkhorn of each assigned crop's scores
    loss, info = SwAVLoss(0.1, 0.05, 3, assign)(scores)
    loop_codes = [loop_sinkhorn(scores[a], 0.05, 3) for a in assign]
    torch.testing.assert_close(info["codes"], torch.stack(loop_codes), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(loss, formula_loss(scores, loop_codes, assign, 0.1), rtol=1e-10, atol=0)


def test_gradient_of_the_loss_by_gradcheck_and_codes_carry_none():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    codes = [torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda *s: swapped_prediction_loss(list(s), codes, [0, 1], 0.1), tuple(scores))
    # SwAVLoss: the codes are targets (no gradient through the Sinkhorn), so its gradient is that of the
    # swapped prediction with the codes held fixed
    loss, info = SwAVLoss(0.1, 0.05, 3, [0, 1])(scores)
    grads = torch.autograd.grad(loss, scores)
    fixed = [c.detach() for c in info["codes"]]
    expected = torch.autograd.grad(formula_loss(scores, fixed, [0, 1], 0.1), scores)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_loss_invariances_batch_order_and_crop_order():
    g = torch.Generator().manual_seed(6)
    scores = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(5)]
    criterion = SwAVLoss(0.1, 0.05, 3, [0, 1])
    loss, info = criterion(scores)
    perm = torch.randperm(6, generator=g)
    loss_p, info_p = criterion([s[perm] for s in scores])
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(info_p["codes"], info["codes"][:, perm])
    # the small crops in another order; the two global crops swapped (their codes swap)
    loss_s, _ = criterion([scores[0], scores[1], scores[4], scores[2], scores[3]])
    loss_g, info_g = criterion([scores[1], scores[0], *scores[2:]])
    torch.testing.assert_close(loss_s, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_g, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(info_g["codes"], info["codes"].flip(0))


def test_bad_settings_are_config_errors():
    for kwargs, key in (({"temperature": 0.0}, "method.temperature"), ({"epsilon": -1.0}, "method.epsilon"),
                        ({"sinkhorn_iterations": 0}, "method.sinkhorn_iterations"),
                        ({"crops_for_assign": [0, 0]}, "method.crops_for_assign"),
                        ({"queue_length": -8}, "method.queue_length"),
                        ({"freeze_prototypes_niters": 1.5}, "method.freeze_prototypes_niters")):
        with pytest.raises(ConfigError, match=key):
            _method(**kwargs)
    method = _method(crops_for_assign=[0, 4])
    with pytest.raises(ConfigError, match=r"crops_for_assign=\[0, 4\].*4 views"):
        method(_views(small=2), None, None)
    with pytest.raises(ConfigError, match="at least 2 views"):
        _method()(_views()[:1], None, None)
    method = _method(queue_length=12, epoch_queue_starts=0)  # batch 8: not a multiple; the release trims to 8
    with pytest.raises(ConfigError, match=r"method.queue_length=12 must be a multiple.*= 8\).*queue_length=8"):
        method(_views(batch=8), None, None)


# --- the method: prototypes, multi-crop, freezing ------------------------------------------------------------


def test_a_step_normalises_the_prototypes_first_and_predicts_codes_from_every_other_crop():
    method = _method()
    with torch.no_grad():
        method.prototypes.weight.mul_(torch.linspace(0.5, 3.0, 6, dtype=torch.float64)[:, None])
    unit = F.normalize(method.prototypes.weight.detach().clone(), dim=1)
    views = _views(small=2)
    out = method(views, None, None)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(6, dtype=torch.float64))
    z = _embeddings(method, views).detach()  # BatchNorm in training mode: the same batch statistics again
    scores = list((z @ unit.t()).split(4))
    codes = [loop_sinkhorn(scores[a], 0.05, 3) for a in (0, 1)]
    torch.testing.assert_close(out.outputs["codes"], torch.stack(codes), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, formula_loss(scores, codes, [0, 1], 0.1), rtol=1e-9, atol=0)
    assert out.outputs["embeddings"].shape == (4, 8) and float(out.parts["queue_used"]) == 0.0
    # the views of one size are one backbone batch: BatchNorm statistics over both 16 px crops together
    apart = torch.cat([method.backbone(v) for v in views])
    grouped = forward_by_resolution(method.backbone, views)
    assert not torch.allclose(grouped, apart)
    torch.testing.assert_close(grouped, torch.cat([method.backbone(torch.cat(views[:2])),
                                                   method.backbone(torch.cat(views[2:]))]))


def test_prototypes_stay_frozen_for_the_first_iterations():
    method = _method(freeze_prototypes_niters=2)
    initial = F.normalize(method.prototypes.weight.detach().clone(), dim=1)
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for step in range(3):
        other = method.projector[0].weight.detach().clone()
        out = method(_views(seed=step), None, None)
        opt.zero_grad()
        out.loss.backward()
        assert method.prototypes.weight.grad is not None
        method.before_optimizer_step(step)
        assert (method.prototypes.weight.grad is None) == (step < 2)
        opt.step()
        assert not torch.equal(method.projector[0].weight, other)  # the rest trains
        if step < 2:  # only the normalisation touched them (weight decay and momentum skip a None gradient)
            torch.testing.assert_close(method.prototypes.weight.detach(), initial, rtol=0, atol=1e-15)
    assert not torch.allclose(method.prototypes.weight.detach(), initial)


def test_bf16_autocast_keeps_scores_codes_and_loss_in_float32():
    method = _method().float()
    views = [v.float() for v in _views()]
    reference = method(views, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(views, None, None)
    assert out.outputs["codes"].dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert abs(float(out.loss.detach()) - float(reference.loss.detach())) < 0.05 * float(reference.loss.detach())


# --- the queue -----------------------------------------------------------------------------------------------


def test_queue_starts_at_its_epoch_fills_newest_first_and_is_used_once_full():
    batch = 4
    method = _method(queue_length=3 * batch, epoch_queue_starts=1)
    assert method.queue.shape == (2, 3 * batch, 8)
    method.set_progress(0.75, 10, per_epoch=False)  # epoch 0: no queue yet
    method(_views(seed=0), None, None)
    assert not method.queue.any()
    written = []
    for step in range(5):
        method.set_progress(1.0 + step / 10, 10, per_epoch=False)
        views = _views(seed=10 + step)
        before = method.queue.clone()
        unit = F.normalize(method.prototypes.weight.detach(), dim=1)
        out = method(views, None, None)
        z = _embeddings(method, views).detach()
        written.append(z.split(batch)[:2])
        full = step >= 3  # three writes of 4 fill 12 rows: the 4th step finds the last row set
        assert float(out.parts["queue_used"]) == float(full)
        for i in (0, 1):  # newest first: this step's crop i, then the step before, ...
            expected = torch.cat([written[s][i] for s in range(step, max(step - 3, -1), -1)])
            torch.testing.assert_close(method.queue[i, :len(expected)], expected, rtol=1e-9, atol=1e-12)
            scores = z.split(batch)[i] @ unit.t()
            queued = before[i] @ unit.t()
            if full:  # codes of the queue's scores then the batch's, only the batch's rows kept
                code = loop_sinkhorn(torch.cat([queued, scores]), 0.05, 3)[-batch:]
            else:
                code = loop_sinkhorn(scores, 0.05, 3)
            torch.testing.assert_close(out.outputs["codes"][i], code, rtol=1e-8, atol=1e-11)


def test_queue_flag_is_the_releases_use_the_queue():
    """main_swav.py: ``use_the_queue`` is cleared every epoch and set by the first assigned crop whose queue has a
    non-zero last row; it then covers every crop for the rest of the epoch, whatever their last rows."""
    method = _method(queue_length=4, epoch_queue_starts=0)
    method.set_progress(0.0, 10, per_epoch=False)
    assert float(method(_views(seed=0), None, None).parts["queue_used"]) == 0.0  # empty before this write
    with torch.no_grad():
        method.queue[1, -1] = 0  # crop 1's queue looks unfilled, crop 0's is full
    method.set_progress(0.5, 10, per_epoch=False)
    unit = F.normalize(method.prototypes.weight.detach(), dim=1)
    before = method.queue.clone()
    views = _views(seed=1)
    out = method(views, None, None)
    assert float(out.parts["queue_used"]) == 1.0
    z1 = _embeddings(method, views).detach().split(4)[1]
    with_queue = loop_sinkhorn(torch.cat([before[1] @ unit.t(), z1 @ unit.t()]), 0.05, 3)[-4:]
    torch.testing.assert_close(out.outputs["codes"][1], with_queue, rtol=1e-8, atol=1e-11)  # crop 1 used it too
    with torch.no_grad():
        method.queue[:, -1] = 0  # both last rows zero: the flag still holds within the epoch ...
    method.set_progress(0.9, 10, per_epoch=False)
    assert float(method(_views(seed=2), None, None).parts["queue_used"]) == 1.0
    with torch.no_grad():
        method.queue[:, -1] = 0
    method.set_progress(1.0, 10, per_epoch=False)  # ... and is cleared by the next epoch
    assert float(method(_views(seed=3), None, None).parts["queue_used"]) == 0.0
    saved = method.random_state()  # what a mid-epoch checkpoint keeps of it
    assert saved == {"swav_queue_flag": {"in_use": False, "epoch": 1}}
    method.queue_in_use, method.queue_flag_epoch = True, 0
    method.set_random_state(saved)
    assert (method.queue_in_use, method.queue_flag_epoch) == (False, 1)


# --- DDP: two gloo ranks against one process on the global batch ----------------------------------------------

WORLD, B, STEPS = 2, 3, 4


def _ddp_method(queue_length: int) -> SwAV:
    method = _method(queue_length=queue_length, epoch_queue_starts=0, freeze_prototypes_niters=1)
    return method.eval()  # BatchNorm on running statistics: each sample's output is independent of the split


def _train_steps(method: SwAV, model: torch.nn.Module, rows: slice) -> dict:
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    record: dict = {"loss": [], "codes": []}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(700 + step)
        views = [torch.randn(WORLD * B, 3, s, s, generator=g, dtype=torch.float64) for s in (16, 16, 8)]
        method.set_progress(step / 10, 10, per_epoch=False)
        out = model([v[rows] for v in views], None, None)
        opt.zero_grad()
        out.loss.backward()
        method.before_optimizer_step(step)
        opt.step()
        record["loss"].append(out.loss.detach())
        record["codes"].append(out.outputs["codes"])
        record.setdefault("used", []).append(float(out.parts["queue_used"]))
    record["params"] = [p.detach().clone() for p in method.parameters()]
    record["queue"] = method.queue.clone()
    return record


class _Killed(Exception):
    pass


RESUME = ["data.subset=32", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
          "model.width=0.25", "train.epochs=2", "monitor.knn_every=0", "observers=[progress]", "train.log_every=1000",
          "train.deterministic=true", "method.name=swav", "method.proj_hidden_dim=16", "method.proj_out_dim=8",
          "method.num_prototypes=10", "method.queue_length=16", "method.epoch_queue_starts=0",
          "method.freeze_prototypes_niters=2", "views.planner=multicrop", "views.num_small=2", "views.small_size=8",
          "train.checkpoint_every_steps=3", "optim.name=larc"]  # 4 steps an epoch; the queue is full after 2


def _interrupted_and_resumed_runs(out: Path) -> bool:
    """The trainer under DDP: ``out/full`` uninterrupted; ``out/part`` killed on every rank right after its first
    mid-epoch checkpoint, then resumed; whether the kill happened."""
    from contrastlab.engine import trainer as trainer_module
    from contrastlab.engine.trainer import train

    train(load_config("demo", [f"out={out / 'full'}", *RESUME]), quiet=True)
    save = trainer_module.Trainer._save

    def save_then_die(self, numbered):
        save(self, numbered)
        if self.progress_in_epoch.batch > 0:
            raise _Killed

    trainer_module.Trainer._save = save_then_die
    died = False
    try:
        train(load_config("demo", [f"out={out / 'part'}", *RESUME]), quiet=True)
    except _Killed:
        died = True
    trainer_module.Trainer._save = save
    train(load_config("demo", [f"out={out / 'part'}", *RESUME, "resume=auto"]), quiet=True)
    return died


def _ddp_worker(rank: int, folder: Path) -> dict:
    method = _ddp_method(queue_length=2 * WORLD * B)
    model = wrap_ddp(method, torch.device("cpu"))
    record = _train_steps(method, model, slice(rank * B, (rank + 1) * B))
    record["ignored"] = sorted(model.parameters_to_ignore)
    record["died"] = _interrupted_and_resumed_runs(folder)
    return record


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One spawn of two gloo ranks serves both DDP tests (a spawn costs seconds)."""
    tmp = tmp_path_factory.mktemp("swav_ddp")
    return tmp, run_on_ranks(_ddp_worker, tmp, WORLD)


def test_ddp_equals_one_process_on_the_global_batch_queue_included(ranks):
    results = ranks[1]
    method = _ddp_method(queue_length=2 * WORLD * B)
    single = _train_steps(method, method, slice(None))
    assert single["used"] == [0.0, 0.0, 1.0, 1.0]  # the global Sinkhorn with the queue in the last two steps
    assert results[0]["ignored"] == ["queue"]
    for step in range(STEPS):
        mean = sum(r["loss"][step] for r in results) / WORLD
        torch.testing.assert_close(mean, single["loss"][step], rtol=1e-10, atol=0)
        for rank, r in enumerate(results):  # each rank's codes are its rows of the global Sinkhorn's
            torch.testing.assert_close(r["codes"][step], single["codes"][step][:, rank * B:(rank + 1) * B],
                                       rtol=1e-9, atol=1e-12)
    for r in results:
        for a, b in zip(r["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # rank r's queue holds its own rows of each global batch, newest first; the two ranks' queues differ
    assert not torch.equal(results[0]["queue"], results[1]["queue"])
    for rank, r in enumerate(results):
        for k in range(2):  # the single queue's block k is the global batch of step STEPS - 1 - k
            block = single["queue"][:, k * WORLD * B + rank * B:k * WORLD * B + (rank + 1) * B]
            torch.testing.assert_close(r["queue"][:, k * B:(k + 1) * B], block, rtol=1e-9, atol=1e-12)


def test_ddp_mid_epoch_resume_gives_each_rank_its_own_queue_back(ranks):
    """The trainer (2 gloo ranks, multi-crop, LARC, the queue in use) killed after a mid-epoch checkpoint and resumed
    gives the uninterrupted run's losses, weights and each rank's own queue, bit for bit."""
    import json

    from contrastlab.engine.checkpoint import load_checkpoint

    tmp_path, results = ranks
    assert [r["died"] for r in results] == [True, True]  # mid-epoch, on both ranks

    def records(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    full, part = records(tmp_path / "full"), records(tmp_path / "part")
    assert [r["loss"] for r in full] == [r["loss"] for r in part]
    assert full[0]["parts"]["queue_used"] == 0.5 and full[1]["parts"]["queue_used"] == 1.0
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    queues = [r["queue"] for r in a["rank_local"]]
    assert not torch.equal(queues[0], queues[1]) and all(q.ne(0).all() for q in queues)  # per rank, full
    for mine, theirs in zip(queues, (r["queue"] for r in b["rank_local"])):
        assert torch.equal(mine, theirs)


# --- command line and recipes --------------------------------------------------------------------------------


def test_cli_trains_multicrop_on_the_batched_gpu_pipeline(tmp_path):
    from contrastlab.cli import main
    from contrastlab.engine.checkpoint import load_checkpoint

    assert main(["train", "cifar10/swav_r18_1000ep", "--smoke", f"out={tmp_path}", "data.pipeline=gpu",
                 "views.planner=multicrop", "views.num_small=2", "model.arch=resnet20", "model.width=0.25",
                 "method.proj_hidden_dim=32", "method.queue_length=16", "method.epoch_queue_starts=0",
                 "observers=[progress]"]) == 0
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["rank_local"][0]["queue"].shape == (2, 16, 128)
    assert ckpt["rank_local"][0]["queue"].ne(0).any(dim=-1).sum() == 2 * 16  # two writes of 8 per global crop


# facebookresearch/swav scripts/swav_*_pretrain.sh (batch = --batch_size 64 x GPUs: 64 for 4096, 4 for 256)
RELEASE_KEYS = ("epochs", "batch", "lr", "final", "warm", "start", "freeze", "queue", "small", "scale")
RELEASE = {name: dict(zip(RELEASE_KEYS, row)) for name, row in {
    "imagenet/swav_r50_800ep": (800, 4096, 4.8, 0.0048, 10, 0.3, 313, 0, 6, [0.14, 1.0]),
    "imagenet/swav_r50_400ep": (400, 4096, 4.8, 0.0048, 10, 0.3, 313, 0, 6, [0.14, 1.0]),
    "imagenet/swav_r50_200ep": (200, 4096, 4.8, 0.0048, 10, 0.3, 313, 0, 6, [0.14, 1.0]),
    "imagenet/swav_r50_100ep": (100, 4096, 4.8, 0.0048, 10, 0.3, 313, 0, 6, [0.14, 1.0]),
    "imagenet/swav_r50_200ep_bs256": (200, 256, 0.6, 0.0006, 0, 0.0, 5005, 3840, 6, [0.14, 1.0]),
    "imagenet/swav_r50_400ep_bs256": (400, 256, 0.6, 0.0006, 0, 0.0, 5005, 3840, 6, [0.14, 1.0]),
    "imagenet/swav_r50_400ep_2x224": (400, 4096, 4.8, 0.0048, 10, 0.3, 313, 0, 0, [0.08, 1.0]),  # --nmb_crops 2
}.items()}


@pytest.mark.parametrize("recipe", sorted(RELEASE))
def test_imagenet_recipes_are_the_released_scripts(recipe):
    r, cfg = RELEASE[recipe], load_config(recipe)
    d = derive(cfg, 1, 1281167)
    assert (cfg.train.epochs, cfg.data.batch_size) == (r["epochs"], r["batch"])
    assert d.steps_per_epoch == 1281167 // r["batch"]  # drop_last, as the release's loader
    assert (d.lr, d.final_lr, d.warmup_start_lr) == pytest.approx((r["lr"], r["final"], r["start"]))
    assert cfg.optim.warmup_epochs == r["warm"] and cfg.optim.schedule == "cosine"
    # apex LARC(clip=False) around SGD(momentum 0.9, wd 1e-6) over every parameter: our larc without exclusions
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("larc", 0.9, 1e-6)
    assert not cfg.optim.exclude_bias_bn_wd and cfg.optim.lars_trust_coefficient == 0.001
    m = cfg.method.params
    assert (m["proj_hidden_dim"], m["proj_out_dim"], m["num_prototypes"]) == (2048, 128, 3000)
    assert (m["temperature"], m["epsilon"], m["sinkhorn_iterations"]) == (0.1, 0.05, 3)
    assert m["crops_for_assign"] == [0, 1] and m["freeze_prototypes_niters"] == r["freeze"]
    assert m["queue_length"] == r["queue"] and m["queue_length"] % r["batch"] == 0  # not trimmed by the release
    assert m["epoch_queue_starts"] == 15 and m.get("gather_distributed", True)  # distributed_sinkhorn
    assert cfg.views.scale == r["scale"] and cfg.views.photometric == "swav"
    assert (cfg.views.num_small, cfg.views.small_size, cfg.views.small_scale) == (6, 96, [0.05, 0.14]) \
        if r["small"] else cfg.views.planner == "random_resized"
    assert cfg.model.arch == "resnet50" and not cfg.model.zero_init_residual and cfg.model.sync_bn
    assert (cfg.linear.lr, cfg.linear.weight_decay, cfg.linear.epochs, cfg.linear.batch_size) == (0.3, 1e-6, 100, 256)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_recipes_are_solo_learns(dataset):
    """vturrisi/solo-learn scripts/pretrain/cifar/swav.yaml and augmentations/symmetric.yaml."""
    cfg = load_config(f"{dataset}/swav_r18_1000ep")
    d = derive(cfg, 1, 50000)
    assert cfg.data.name == dataset and cfg.train.epochs == 1000 and cfg.data.batch_size == 256
    assert cfg.model.arch == "resnet18" and cfg.model.cifar_stem
    assert (d.lr, d.warmup_start_lr, d.final_lr, cfg.optim.warmup_epochs) == pytest.approx((0.6, 3e-5, 0.0, 10))
    o = cfg.optim  # solo-learn's LARS: apex LARC's clipping mode, biases and norms plain SGD without weight decay
    assert (o.name, o.larc_clip, o.larc_exclude, o.lars_trust_coefficient, o.weight_decay) == ("larc", True, True, 0.02,
                                                                                             1e-6)
    m = cfg.method.params
    assert (m["proj_hidden_dim"], m["proj_out_dim"], m["num_prototypes"], m["temperature"]) == (2048, 128, 3000, 0.1)
    assert (m["queue_length"], m["epoch_queue_starts"]) == (3840, 50)
    assert m["freeze_prototypes_niters"] == 2 * d.steps_per_epoch  # freeze_prototypes_epochs: 2
    assert cfg.views.scale == [0.08, 1.0] and cfg.views.num_views == 2 and cfg.views.photometric == "swav"


# --- contrastlab import --from swav ---------------------------------------------------------------------------


def _upstream_swav(seed: int) -> torch.nn.Module:
    """facebookresearch/swav src/resnet50.py's model at small widths (torchvision's ResNet names at the top level,
    projection_head Linear (with bias) - BN - ReLU - Linear, prototypes without bias), every tensor random."""
    import torchvision

    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.projection_head = torch.nn.Sequential(torch.nn.Linear(512, 32), torch.nn.BatchNorm1d(32),
                                              torch.nn.ReLU(inplace=True), torch.nn.Linear(32, 16))
    net.prototypes = torch.nn.Linear(16, 10, bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.1)
    return net.eval()


def test_import_of_released_files_gives_the_upstream_outputs(tmp_path):
    from contrastlab import assemble
    from contrastlab.cli import main
    from contrastlab.config.load import config_from_dict
    from contrastlab.engine.checkpoint import load_checkpoint
    from contrastlab.errors import CheckpointError
    from contrastlab.importers import import_checkpoint

    up = _upstream_swav(30)
    zoo = tmp_path / "swav_400ep_bs256_pretrain.pth.tar"  # hubconf.py's files: the DDP state dict itself
    torch.save({f"module.{k}": v for k, v in up.state_dict().items()}, zoo)
    probe = tmp_path / "swav_400ep_bs256_eval_linear.pth.tar"  # eval_linear.py: the classifier alone
    linear = torch.nn.Linear(512, 7)
    torch.save({"epoch": 100, "state_dict": {f"module.linear.{k}": v for k, v in linear.state_dict().items()},
                "optimizer": {}, "scheduler": {}, "best_acc": 74.3}, probe)
    small = ["model.arch=resnet18", "method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.num_prototypes=10"]
    out = tmp_path / "imported.pt"
    assert main(["import", str(zoo), "--from", "swav", "--classifier", str(probe), "--out", str(out), *small]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["recipe"] == "imagenet/swav_r50_400ep_bs256"  # from the file's name
    assert ckpt["imported"]["classifier_file"]["best_acc"] == 74.3
    assert torch.equal(ckpt["classifier"]["weight"], linear.weight.detach())
    method = assemble.method(config_from_dict(__import__("yaml").safe_load(ckpt["config"])), 1)
    method.load_state_dict(ckpt["method"], strict=True)
    method.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # forward_backbone, forward_head: the bias before BatchNorm folded into its running mean
        feats = up.avgpool(up.layer4(up.layer3(up.layer2(up.layer1(up.maxpool(up.relu(up.bn1(up.conv1(x)))))))))
        expected = F.normalize(up.projection_head(feats.flatten(1)), dim=1)
        torch.testing.assert_close(method.backbone(x), feats.flatten(1), rtol=1e-5, atol=1e-5)
        z = F.normalize(method.projector(method.backbone(x)), dim=1)
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(method.prototypes(z), up.prototypes(expected), rtol=1e-5, atol=1e-5)
    assert not method.queue.any()  # saved apart upstream (queue<rank>.pth): refilled

    training = tmp_path / "checkpoint.pth.tar"  # main_swav.py's own checkpoint
    torch.save({"epoch": 150, "state_dict": {f"module.{k}": v for k, v in up.state_dict().items()},
                "optimizer": {}, "amp": {}}, training)
    summary = import_checkpoint(training, "swav", tmp_path / "t.pt", overrides=small, log=lambda s: None)
    assert summary["recipe"] == "imagenet/swav_r50_200ep" and summary["epoch"] == 150
    with pytest.raises(CheckpointError, match="--classifier"):
        import_checkpoint(probe, "swav", tmp_path / "x.pt", log=lambda s: None)
    wide = {k: v for k, v in ckpt["method"].items() if k.startswith("backbone.")}
    wide = {k[len("backbone."):]: v for k, v in wide.items()}
    wide.update({"conv1.weight": torch.zeros(128, 3, 7, 7), "layer1.0.conv3.weight": torch.zeros(1),
                 "projection_head.0.weight": torch.zeros(1), "prototypes.weight": torch.zeros(1)})
    torch.save(wide, tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar")
    with pytest.raises(CheckpointError, match="widened x2"):
        import_checkpoint(tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar", "swav", tmp_path / "w.pt",
                          log=lambda s: None)


def test_every_recipe_the_importer_picks_exists():
    from contrastlab.config.load import recipe_names
    from contrastlab.importers.base import PRETRAIN, Released
    from contrastlab.importers.swav import SwAVImporter

    names = set(recipe_names())
    for file, epoch, expected in (("swav_800ep_pretrain.pth.tar", None, "swav_r50_800ep"),
                                  ("swav_100ep_pretrain.pth.tar", None, "swav_r50_100ep"),
                                  ("swav_200ep_bs256_pretrain.pth.tar", None, "swav_r50_200ep_bs256"),
                                  ("swav_400ep_2x224_pretrain.pth.tar", None, "swav_r50_400ep_2x224"),
                                  ("checkpoint.pth.tar", 37, "swav_r50_100ep"),  # a run of at least 37 epochs
                                  ("checkpoint.pth.tar", None, "swav_r50_800ep"),  # hubconf.py's model
                                  ("ckp-399.pth", 400, "swav_r50_400ep")):
        chosen = SwAVImporter().default_recipe(Released(Path(file), {}, {}, PRETRAIN, "resnet", epoch))
        assert chosen == f"imagenet/{expected}" and chosen in names, (file, chosen)


def test_score_statistics_are_refused_with_the_reason(tmp_path, capsys):
    """SwAV scores crops against prototypes: no positive and negatives for FT's score statistics."""
    from contrastlab.cli import main

    code = main(["train", "cifar10/swav_r18_1000ep", "--smoke", f"out={tmp_path}",
                 "observers=[progress,score_statistics]"])
    assert code == 2 and "score_statistics needs a contrastive method with logits; method 'swav' has none" in \
        capsys.readouterr().err
