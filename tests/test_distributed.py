"""Two gloo ranks on the CPU: gathered NT-Xent, the MoCo queue, MoCo v3, CaCo and MCL against single-process computations.

One spawn (module-scoped fixture) runs every two-rank scenario and saves what each rank saw; the tests
compare those files with computations on the full global batch in this process.

Gradient convention (DDP): each rank's NT-Xent loss is the mean over its own ``2B`` anchors, and the
backward of ``gather_with_grad`` sums, into each rank's slice, the gradients of *every* rank's loss. So
rank ``r`` holds ``d(sum_s loss_s) / d z_r = W * dL / d z_r`` where ``L`` is the single-process loss on
the global batch (``L = mean_s loss_s`` because every rank has the same number of anchors). DDP then
averages parameter gradients over the ``W`` ranks, which divides by ``W`` and gives exactly ``dL/dθ``.
The test therefore checks ``mean_s loss_s == L`` and ``grad_r / W == dL / d z_r``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_ranks import free_port, start_ranks

from contrastlab.engine.distributed import broadcast_ignored_buffers, wrap_ddp
from contrastlab.memory import FeatureQueue
from contrastlab.methods import MCL, CaCo, MoCo, MoCoMCL, MoCoV3
from contrastlab.models import build_backbone, build_cohort
from contrastlab.objectives import NTXentLoss

WORLD = 2
B = 3  # per rank
D = 5
T = 0.3
QUEUE = 24  # a multiple of the global batch of 6 keys


def _global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), torch.randn(
        WORLD * B, D, generator=g, dtype=torch.float64
    )


def _global_keys(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return F.normalize(torch.randn(WORLD * B, D, generator=g), dim=1)


def _moco() -> MoCo:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    return MoCo(net, dim, proj_hidden_dim=16, proj_out_dim=D, queue_size=QUEUE, shuffle_bn=True)


def _global_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * B, 3, 8, 8, generator=g), torch.randn(WORLD * B, 3, 8, 8, generator=g)


CACO_STEPS = 3


def _caco(warm_start: bool) -> CaCo:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    method = CaCo(net, dim, proj_hidden_dim=16, proj_out_dim=D, memory_size=2 * WORLD * B, warm_start=warm_start)
    method.memory_lr = 0.5
    return method.eval()  # BatchNorm on running statistics: each sample's output is independent of the split


def _run_caco(method: CaCo, model: torch.nn.Module, rows: slice) -> None:
    """CACO_STEPS SGD steps on the global images restricted to ``rows`` (a rank's slice, or everything)."""
    opt = torch.optim.SGD(method.param_groups(), lr=0.1)
    for step in range(CACO_STEPS):
        g = torch.Generator().manual_seed(300 + step)
        x1, x2 = (torch.randn(WORLD * B, 3, 8, 8, generator=g) for _ in range(2))
        out = model([x1[rows], x2[rows]], torch.zeros(B, dtype=torch.long), torch.arange(B))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(0.9)


def _mcl_method() -> MCL:
    torch.manual_seed(0)
    cohort = build_cohort("resnet20", 2, "layer1", width=0.25)
    return MCL(cohort, cohort.feature_dim, num_classes=WORLD * B).eval()


def _run_mcl(method: MCL, model: torch.nn.Module, rows: slice) -> None:
    """One SGD step on a global batch of WORLD * B / 2 classes x 2 images; a rank holds whole class pairs."""
    g = torch.Generator().manual_seed(500)
    x = torch.randn(2 * WORLD * B, 3, 8, 8, generator=g)
    labels = torch.arange(WORLD * B).repeat_interleave(2)
    rows = slice(2 * rows.start, 2 * rows.stop) if rows.start is not None else rows
    opt = torch.optim.SGD(method.param_groups(), lr=0.5)
    out = model([x[rows]], labels[rows], torch.arange(2 * WORLD * B)[rows])
    opt.zero_grad()
    out.loss.backward()
    opt.step()


def _bank_mcl_method() -> MCL:
    torch.manual_seed(0)
    cohort = build_cohort("resnet20", 2, width=0.25)
    targets = torch.arange(WORLD * B).repeat_interleave(2).tolist() * 2  # 2 * 2 * WORLD * B images
    return MCL(cohort, cohort.feature_dim, num_classes=WORLD * B, contrast="memory_bank",
               dataset_targets=targets, neg_k=8).eval()


def _moco_mcl_method() -> MoCoMCL:
    torch.manual_seed(0)
    cohort = build_cohort("resnet20", 2, width=0.25)
    return MoCoMCL(cohort, cohort.feature_dim, proj_out_dim=D, queue_size=4 * WORLD * B).eval()


def _run_moco_mcl(method: MoCoMCL, model: torch.nn.Module, rows: slice) -> None:
    opt = torch.optim.SGD(method.param_groups(), lr=0.1)
    for step in range(2):
        g = torch.Generator().manual_seed(600 + step)
        x1, x2 = (torch.randn(WORLD * B, 3, 8, 8, generator=g) for _ in range(2))
        out = model([x1[rows], x2[rows]], torch.zeros(B, dtype=torch.long), torch.arange(B))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(0.9)


def _mocov3() -> MoCoV3:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    return MoCoV3(net, dim, proj_hidden_dim=16, proj_out_dim=D, temperature=T).eval()  # BN: running statistics


def _run_mocov3(method: MoCoV3, model: torch.nn.Module, rows: slice) -> torch.Tensor:
    """Two SGD steps with momentum updates on the global images; returns the first step's loss."""
    opt = torch.optim.SGD(method.param_groups(), lr=0.5)
    x1, x2 = _global_images()
    losses = []
    for _ in range(2):
        out = model([x1[rows], x2[rows]], torch.zeros(B, dtype=torch.long), torch.arange(B))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(0.9)
        losses.append(out.loss.detach())
    return losses[0]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mine = slice(rank * B, (rank + 1) * B)
        result: dict[str, object] = {}

        # (a) NT-Xent with negatives gathered from both ranks.
        z1_all, z2_all = _global_embeddings()
        z1 = z1_all[mine].clone().requires_grad_(True)
        z2 = z2_all[mine].clone().requires_grad_(True)
        loss, info = NTXentLoss(temperature=T, gather_distributed=True)(z1, z2)
        loss.backward()
        result.update(
            loss=loss.detach(), grad1=z1.grad, grad2=z2.grad, pos=info["pos_logits"], neg=info["neg_logits"]
        )

        # (b) FeatureQueue: two gathered writes of the global batch.
        queue = FeatureQueue(D, QUEUE)
        for step in range(2):
            queue.enqueue(_global_keys(step)[mine], gather_distributed=True)
        result.update(queue=queue.queue.clone(), ptr=int(queue.ptr))

        # (c) MoCo shuffle-BN: with the key encoder in eval mode, keys come back aligned with the inputs.
        moco = _moco()
        x1_all, x2_all = _global_images()
        moco.key_encoder.eval()
        with torch.no_grad():
            result["shuffled_keys"] = moco.compute_keys(x2_all[mine])
            result["direct_keys"] = F.normalize(moco.key_encoder(x2_all[mine]), dim=1)
        moco.key_encoder.train()

        # (d) One MoCo training step: the queue is written with the keys of both ranks.
        out = moco([x1_all[mine], x2_all[mine]], torch.zeros(B, dtype=torch.long), torch.arange(B))
        out.loss.backward()
        result.update(
            moco_keys=out.outputs["keys"], moco_queue=moco.queue.queue.clone(), moco_ptr=int(moco.queue.ptr)
        )
        # (e) CaCo under DDP: memories that start different (the upstream --ad_init 0 bug) are broadcast, then
        # stay identical through warm-start writes and memory steps.
        for warm in (False, True):
            caco = _caco(warm)
            caco.memory.weight.copy_(torch.randn(caco.memory.weight.shape,
                                                 generator=torch.Generator().manual_seed(1000 + rank)))
            result[f"caco_initial_{warm}"] = caco.memory.weight.clone()
            broadcast_ignored_buffers(caco)
            ddp = wrap_ddp(caco, torch.device("cpu"))
            result["ddp_ignored"] = sorted(ddp.parameters_to_ignore)
            _run_caco(caco, ddp, mine)
            result[f"caco_memory_{warm}"] = caco.memory.weight.clone()
            result[f"caco_velocity_{warm}"] = caco.memory.velocity.clone()
        # (f) supervised MCL (in-batch, candidates gathered with gradient) and (g) MoCo-MCL's lockstep queues.
        mcl = _mcl_method()
        _run_mcl(mcl, wrap_ddp(mcl, torch.device("cpu")), mine)
        result["mcl_params"] = [p.detach().clone() for p in mcl.parameters()]
        bank_mcl = _bank_mcl_method()
        _run_mcl(bank_mcl, wrap_ddp(bank_mcl, torch.device("cpu")), mine)
        result["bank"] = bank_mcl.bank.memory.clone()
        moco_mcl = _moco_mcl_method()
        broadcast_ignored_buffers(moco_mcl)
        _run_moco_mcl(moco_mcl, wrap_ddp(moco_mcl, torch.device("cpu")), mine)
        result["moco_mcl_queues"] = [q.queue.clone() for q in moco_mcl.queues]
        # (h) MoCo v3: in-batch keys gathered from both ranks, positive at the global index, under DDP.
        mocov3 = _mocov3()
        result["mocov3_loss"] = _run_mocov3(mocov3, wrap_ddp(mocov3, torch.device("cpu")), mine)
        result["mocov3_params"] = [p.detach().clone() for p in mocov3.parameters()]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    start_ranks(_worker, (str(tmp / "init"), str(tmp)), WORLD)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_gathered_nt_xent_equals_single_process(ranks: list[dict]) -> None:
    z1 = _global_embeddings()[0].requires_grad_(True)
    z2 = _global_embeddings()[1].requires_grad_(True)
    loss, info = NTXentLoss(temperature=T, gather_distributed=False)(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))

    assert sum(r["loss"] for r in ranks).item() / WORLD == pytest.approx(loss.item(), rel=1e-10)
    for rank, r in enumerate(ranks):
        mine = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(r["grad1"] / WORLD, g1[mine])
        torch.testing.assert_close(r["grad2"] / WORLD, g2[mine])
        # Positives: anchor i of view 1 pairs with sample i of view 2 of the same rank.
        global_pos = torch.cat([info["pos_logits"][: WORLD * B][mine], info["pos_logits"][WORLD * B :][mine]])
        torch.testing.assert_close(r["pos"], global_pos)
        assert r["neg"].shape == (2 * B, 2 * WORLD * B - 2)
        # Same negative set as the single-process anchor (column order may differ).
        for a in range(2 * B):
            view, i = divmod(a, B)
            global_row = view * WORLD * B + rank * B + i
            torch.testing.assert_close(
                r["neg"][a].sort().values, info["neg_logits"][global_row].sort().values
            )


def test_queue_gathered_before_enqueue(ranks: list[dict]) -> None:
    single = FeatureQueue(D, QUEUE)
    for step in range(2):
        single.enqueue(_global_keys(step), gather_distributed=False)
    for r in ranks:
        assert torch.equal(r["queue"], single.queue)
        assert r["ptr"] == int(single.ptr) == 2 * WORLD * B
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])


def test_moco_shuffle_bn_keeps_keys_aligned(ranks: list[dict]) -> None:
    for r in ranks:
        torch.testing.assert_close(r["shuffled_keys"], r["direct_keys"])


def test_moco_step_enqueues_global_keys_on_every_rank(ranks: list[dict]) -> None:
    assert torch.equal(ranks[0]["moco_queue"], ranks[1]["moco_queue"])
    written = torch.cat([r["moco_keys"] for r in ranks])
    torch.testing.assert_close(ranks[0]["moco_queue"][: WORLD * B], written, rtol=0, atol=0)
    initial = _moco().queue.queue
    assert torch.equal(ranks[0]["moco_queue"][WORLD * B :], initial[WORLD * B :])
    assert ranks[0]["moco_ptr"] == ranks[1]["moco_ptr"] == WORLD * B


@pytest.mark.parametrize("warm", [False, True])
def test_caco_memory_identical_across_ranks_and_equal_to_single_process(ranks: list[dict], warm: bool) -> None:
    assert ranks[0]["ddp_ignored"] == ["memory.velocity", "memory.weight"]  # DDP never re-broadcasts the memory
    assert not torch.equal(ranks[0][f"caco_initial_{warm}"], ranks[1][f"caco_initial_{warm}"])
    assert torch.equal(ranks[0][f"caco_memory_{warm}"], ranks[1][f"caco_memory_{warm}"])
    assert torch.equal(ranks[0][f"caco_velocity_{warm}"], ranks[1][f"caco_velocity_{warm}"])
    single = _caco(warm)
    single.memory.weight.copy_(ranks[0][f"caco_initial_{warm}"])  # rank 0's memory is what every rank starts from
    _run_caco(single, single, slice(None))
    assert single.memory.velocity.abs().sum() > 0  # the memory really learned, after the warm start if any
    torch.testing.assert_close(ranks[0][f"caco_memory_{warm}"], single.memory.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0][f"caco_velocity_{warm}"], single.memory.velocity, rtol=1e-4, atol=1e-5)


def test_mcl_two_ranks_equal_single_process(ranks: list[dict]) -> None:
    """Gathered in-batch MCL under DDP takes the single-process step on the global batch."""
    single = _mcl_method()
    single.mutual.gather_distributed = False
    _run_mcl(single, single, slice(None))
    initial = list(_mcl_method().parameters())
    assert any(not torch.equal(p, q) for p, q in zip(single.parameters(), initial))  # the step moved something
    for a, b, p in zip(ranks[0]["mcl_params"], ranks[1]["mcl_params"], single.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=1e-4, atol=1e-5)


def test_moco_mcl_queues_gathered_in_lockstep(ranks: list[dict]) -> None:
    single = _moco_mcl_method()
    _run_moco_mcl(single, single, slice(None))
    for peer in range(2):
        assert torch.equal(ranks[0]["moco_mcl_queues"][peer], ranks[1]["moco_mcl_queues"][peer])
        torch.testing.assert_close(ranks[0]["moco_mcl_queues"][peer], single.queues[peer].queue,
                                   rtol=1e-4, atol=1e-5)


def test_mcl_memory_banks_identical_across_ranks_and_equal_to_single_process(ranks: list[dict]) -> None:
    """Bank rows are written from the gathered anchors of every rank (the sampled negatives do not matter)."""
    single = _bank_mcl_method()
    before = single.bank.memory.clone()
    _run_mcl(single, single, slice(None))
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])
    torch.testing.assert_close(ranks[0]["bank"], single.bank.memory, rtol=1e-4, atol=1e-5)
    assert not torch.equal(single.bank.memory, before)


def test_mocov3_two_ranks_equal_single_process_on_the_global_batch(ranks: list[dict]) -> None:
    """Each rank's loss is the mean over its own queries against all 2B keys; their mean is the single-process
    loss on the global batch, and DDP's averaged gradients take the same steps (key encoder included)."""
    single = _mocov3()
    loss = _run_mocov3(single, single, slice(None))
    assert (ranks[0]["mocov3_loss"] + ranks[1]["mocov3_loss"]).item() / WORLD == pytest.approx(loss.item(), rel=1e-5)
    assert ranks[0]["mocov3_loss"].item() != pytest.approx(ranks[1]["mocov3_loss"].item())
    initial = list(_mocov3().parameters())
    assert any(not torch.equal(p, q) for p, q in zip(single.parameters(), initial))
    for a, b, p in zip(ranks[0]["mocov3_params"], ranks[1]["mocov3_params"], single.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=1e-4, atol=1e-5)


_EXIT_PROBE = """
import atexit, os, sys
import torch.distributed as td
def report():  # registered first, so it runs after contrastlab's exit handler
    print("group alive at exit:", td.is_initialized(), "threads:", len(os.listdir("/proc/self/task")), flush=True)
atexit.register(report)
import torch
import contrastlab.engine.trainer  # imports what a trainer process imports (torchvision, torch._dynamo) first
from contrastlab.engine.distributed import init_distributed, leave_group_at_exit
init_distributed("cpu")
class Run:  # a trainer holding its DDP model in a reference cycle, as contrastlab's Trainer does
    pass
run = Run()
run.me, run.model = run, torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
run.model(torch.randn(3, 4)).sum().backward()  # gradients all-reduced through the group's gloo threads
del run
if os.environ["RANK"] == "1":
    raise RuntimeError("an unhandled error")
if os.environ["RANK"] == "2":
    leave_group_at_exit()
"""


def test_a_rank_destroys_its_process_group_when_it_ends_cleanly_only(tmp_path: Path) -> None:
    """Three ranks formed by ``init_distributed``, each with a DDP model in a reference cycle: the one that ends
    normally has destroyed its group, and its gloo threads have ended, by the time the interpreter finalises (left to
    finalisation, gloo ranks at times abort: benchmarks/gloo_exit.py); after an unhandled exception, or when told to
    leave it (an interrupt), the group is kept."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "3", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _EXIT_PROBE], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    assert "group alive at exit: False threads: 1\n" in outs[0][0]  # the main thread only
    assert "group alive at exit: True" in outs[1][0] and "an unhandled error" in outs[1][1]
    assert "group alive at exit: True" in outs[2][0]
