"""MCL methods: supervised MCL (in-batch, memory bank, baseline), logit distillation, MoCo-MCL, evaluation.

The loss terms themselves are checked against explicit loops in test_mutual.py; here the methods' wiring
is checked against computations from their submodules, and the queues' lockstep against known keys.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from contrastlab.config.load import load_config
from contrastlab.engine.trainer import train
from contrastlab.errors import ConfigError
from contrastlab.methods import MCL, MoCoMCL, build_method
from contrastlab.models import build_backbone, build_cohort
from contrastlab.objectives import MutualContrastLoss, logit_distillation, moco_mutual_loss
from contrastlab.observers.classification_monitor import ClassificationMonitor

torch.set_num_threads(1)
B, S, C = 8, 16, 4


def _labels() -> torch.Tensor:
    return torch.arange(C).repeat_interleave(2)  # 4 classes x 2 images: every anchor has one positive


def _images(seed: int = 0, n: int = B) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _mcl(peers: int = 2, shared_until: str | None = None, **kw) -> MCL:
    torch.manual_seed(0)
    cohort = build_cohort("resnet20", peers, shared_until, width=0.25)
    return MCL(cohort, cohort.feature_dim, num_classes=C, **kw)


def test_supervised_mcl_loss_is_cross_entropy_plus_the_mutual_terms():
    method = _mcl(peers=3, shared_until="layer1").eval()  # eval: a second forward gives the same features
    x, y = _images(), _labels()
    out = method([x], y, torch.arange(B))
    feats = method.cohort(x)
    ce = sum(F.cross_entropy(cls(h), y) for cls, h in zip(method.classifiers, feats))
    terms = MutualContrastLoss(temperature=0.1)([e(h) for e, h in zip(method.embeds, feats)], y)
    assert out.loss.item() == pytest.approx((ce + terms.loss).item(), rel=1e-5)
    assert {"cross_entropy", "vcl", "icl", "soft_vcl", "soft_icl", "train_top1_peer2"} <= set(out.parts)
    out.loss.backward()
    trunk = method.cohort.trunk_parameters()
    assert trunk and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)


def test_baseline_is_cross_entropy_only_and_kd_adds_the_distillation():
    base = _mcl(contrast="none").eval()
    x, y = _images(1), _labels()
    out = base([x], y, torch.arange(B))
    logits = base.logits(x)
    assert len(base.embeds) == 0
    assert out.loss.item() == pytest.approx(sum(F.cross_entropy(z, y) for z in logits).item(), rel=1e-5)
    kd = _mcl(contrast="none", logit_distill=True, distill_targets="last").eval()
    out = kd([x], y, torch.arange(B))
    logits = kd.logits(x)
    expected = sum(F.cross_entropy(z, y) for z in logits) + logit_distillation(logits, targets="last").loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "logit_kd" in out.parts


def test_predict_gives_every_peer_and_the_ensemble():
    method = _mcl(peers=2).eval()
    x = _images(2)
    scores = method.predict(x)
    logits = method.logits(x)
    assert set(scores) == {"peer0", "peer1", "ensemble"}
    torch.testing.assert_close(scores["ensemble"], logits[0] + logits[1])


def test_classification_monitor_matches_a_direct_count():
    method = _mcl(peers=2)
    images, labels = _images(3, 20), torch.randint(0, C, (20,))
    data = [([images[i]], int(labels[i]), i) for i in range(20)]
    result = ClassificationMonitor(DataLoader(data, batch_size=6)).evaluate(method)
    assert method.training  # the monitor restores the mode
    method.eval()
    with torch.no_grad():
        scores = method.predict(images)
    expected = {k: 100.0 * (v.argmax(1) == labels).float().mean().item() for k, v in scores.items()}
    for head, value in expected.items():
        assert result[head] == pytest.approx(value)
    assert result["peer_mean"] == pytest.approx((expected["peer0"] + expected["peer1"]) / 2)
    assert result["peer_best"] == pytest.approx(max(expected["peer0"], expected["peer1"]))


def test_memory_bank_variant_updates_the_anchors_rows_only():
    targets = [i % C for i in range(40)]
    method = _mcl(contrast="memory_bank", dataset_targets=targets, neg_k=16).eval()
    index = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    labels = torch.tensor([targets[i] for i in index])
    before = method.bank.memory.clone()
    out = method([_images(4)], labels, index)
    assert torch.isfinite(out.loss) and method.contrast == "memory_bank"
    changed = (method.bank.memory != before).any(dim=-1)  # [peers, N]
    assert changed[:, index].all() and not changed[:, 8:].any()
    with torch.no_grad():  # the rows moved toward the peers' normalised embeddings
        z = [F.normalize(e(h), dim=1) for e, h in zip(method.embeds, method.cohort(_images(4)))]
    for n in range(2):
        expected = F.normalize(0.5 * before[n, index] + 0.5 * z[n], dim=1)
        torch.testing.assert_close(method.bank.memory[n, index], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="dataset_targets"):
        _mcl(contrast="memory_bank")


def test_cohort_methods_need_a_cohort_and_single_methods_refuse_peers(tmp_path):
    net, dim = build_backbone("resnet20", width=0.25)
    with pytest.raises(ConfigError, match="model.peers"):
        build_method("mcl", net, dim, num_classes=10)
    with pytest.raises(ConfigError, match="cohort method"):
        train(load_config("demo", [f"out={tmp_path}", "model.peers=2", "train.device=cpu"]), quiet=True)


# --- MoCo-MCL ---------------------------------------------------------------------------------------------

class _ImageCode(nn.Module):
    """A fake key encoder: each image's key is a fixed code of its first pixel, different per peer."""

    def __init__(self, peers: int, dim: int) -> None:
        super().__init__()
        self.peers, self.dim = peers, dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        v = x[:, 0, 0, 0]
        return [F.normalize(torch.stack([torch.sin((p + 1) * (j + 1) * v) for j in range(self.dim)], 1), dim=1)
                for p in range(self.peers)]


def _moco_mcl(queue: int = 16) -> MoCoMCL:
    torch.manual_seed(0)
    cohort = build_cohort("resnet20", 2, width=0.25)
    return MoCoMCL(cohort, cohort.feature_dim, proj_out_dim=6, queue_size=queue, shuffle_bn=False)


def test_moco_mcl_loss_and_lockstep_queues():
    method = _moco_mcl()
    x1, x2 = _images(5), _images(6)
    queues = [q.queue.clone() for q in method.queues]
    out = method([x1, x2], None, None)
    with torch.no_grad():
        keys = method.key_encoder(x2)
    q = [p(h) for p, h in zip(method.projectors, method.cohort(x1))]
    expected = moco_mutual_loss(q, keys, queues, temperature=0.07)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-4)
    for peer in range(2):
        torch.testing.assert_close(method.queues[peer].queue[:B], keys[peer])

    # lockstep: with keys that encode the image, column k of every queue comes from the same image
    method = _moco_mcl(queue=24)
    method.key_encoder = _ImageCode(2, 6)
    method.momentum_pairs = list  # the fake key encoder has no parameters to follow
    seen = []
    for step in range(3):
        x2 = _images(10 + step)
        seen.append(x2[:, 0, 0, 0])
        method([_images(20 + step), x2], None, None)
    codes = _ImageCode(2, 6)(torch.cat(seen)[:, None, None, None].expand(-1, 3, 1, 1))
    for peer in range(2):
        torch.testing.assert_close(method.queues[peer].queue, codes[peer])


def test_moco_mcl_momentum_update_moves_every_peer():
    method = _moco_mcl()
    with torch.no_grad():
        for p in method.cohort.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.key_encoder.parameters()]
    online = list(method.cohort.parameters()) + list(method.projectors.parameters())
    method.after_optimizer_step(0.9)
    for b, a, o in zip(before, method.key_encoder.parameters(), online):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)


# --- training -------------------------------------------------------------------------------------------

def test_mcl_recipe_trains_with_the_m_per_class_sampler_and_reports_final_epoch_accuracy(tmp_path):
    from test_train import _Subset

    cfg = load_config("cifar100/mcl_x2_r32_300ep", [
        f"out={tmp_path}", "data.name=demo", "data.root=null", "data.batch_size=16", "data.workers=0",
        "data.image_size=16", "train.device=cpu", "model.arch=resnet20", "model.width=0.25", "train.epochs=2",
        "monitor.classify_every=1", "monitor.max_bank=32", "monitor.max_test=32", "monitor.knn_k=5",
        "observers=[progress,knn,test_accuracy,localiser]", "train.log_every=1000",
    ])
    with _Subset(64):
        results = train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"peer0", "peer1", "ensemble", "peer_mean", "peer_best"} <= set(records[-1]["test_top1"])
    assert results["test_top1"] == records[-1]["test_top1"]  # the final epoch, not the best one
    assert records[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()))
