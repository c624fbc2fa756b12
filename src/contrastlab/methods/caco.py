"""CaCo: contrast against a learnable memory of adversarial negatives and cooperative positives.

Wang, Qi, "Contrastive Learning with Cooperative-Adversarial Negatives and Positives", TPAMI 2023
(arXiv 2203.14370). Behaviour follows the released code (github.com/maple-research-lab/CaCo); where upstream had a defect the
fix is the default (below).

One step, two views (``update_sym_network`` upstream):

1. online queries ``q_1, q_2`` (L2-normalised 3-layer projector output, no predictor) and momentum keys
   ``k_1, k_2``; the key encoder's EMA happens before the keys (here: right after the previous optimiser
   step, which is the same sequence of key encoders);
2. similarities to the column-normalised memory ``S_v = q_v Ŵ`` (``[B, K]``, no key column);
3. cooperative positives from the *other* view's key: ``y_1 = argmax k_2 Ŵ``, ``y_2 = argmax k_1 Ŵ``;
4. loss ``CE(S_1 / tau, y_1) + CE(S_2 / tau, y_2)``: summed over the views, as released;
5. the memory gradient :func:`~contrastlab.memory.learnable.memory_gradient` of each view at ``tau_m``
   from these pre-step ``q`` and ``S``, summed over the views, averaged over ranks and applied after the
   encoder step (:meth:`CaCo.after_optimizer_step`) with the memory learning rate of the current epoch.

Multi-crop (``update_multicrop_network``): ``views[:2]`` are the global crops, the rest small crops. Every
crop is a query, only the global crops have keys, and a query never takes the positive chosen by its
own key: the "big" pairs (0 <- 1, 1 <- 0) and the "mini" pairs (every small crop <- each global key) each
average their cross-entropies, and ``loss = big + mini``; the memory gradient is averaged the same way.
So multi-crop *averages* where two-view training *sums*: a factor of 2 on the big-pair terms, kept as
released.

Warm start (``--ad_init``, ``training/init_memory.py``): before the first epoch, a MoCo phase fills the
memory. Each step scores ``q_1`` against ``[k_2, Ŵ]`` at temperature 0.2 with the key as class 0, trains
the encoder with it (at the full learning rate, no warm-up: the trainer's job), EMAs the key encoder
with momentum 0.999 and writes the keys of the global batch into the next block of memory columns. When
all ``K`` columns are written the key encoder is re-copied from the online encoder. Upstream also pushes
view 2 through the online encoder and discards the result (it only moves BatchNorm running statistics);
that forward is skipped here.

**Feature Transformation** (Zhu et al., ICCV 2021; ``feature_transform``, off by default) shapes the encoder's
loss only. A query's positive is its cooperative memory column ``w_y``, so the pair ``(q, w_y)`` is
extrapolated, and the negatives are the other memory columns, each interpolated with a random partner
column (the mixture at ``y`` removed): ``CE([q'.w'_y, q'.n'_j (j != y)] / tau, 0)``, which is the plain loss
when FT is inactive. The memory is never modified by FT, and its adversarial gradient is computed from the
raw similarities, as the closed form it implements is derived for them. The warm start never uses FT.

Fixed upstream defects: without warm start, upstream ranks started with different random memories; here
the trainer broadcasts rank 0's memory. Logged metrics carry honest names: ``memory_index_acc`` (upstream
"Acc@1", how often the query's most similar column is its assigned positive) and ``positive_prob_tau_m``
(upstream "MemLoss", the mean softmax probability of the positive at ``tau_m``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_no_grad
from contrastlab.errors import ConfigError
from contrastlab.memory.learnable import LearnableMemory, memory_gradient
from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.ema import copy_params_, ema_update_, momentum_copy
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.batch_info_nce import split_positive
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform
from contrastlab.registry import register_method

__all__ = ["CaCo", "memory_learning_rate"]


def memory_learning_rate(epoch: float, total_epochs: int, *, base: float, final: float, warmup_epochs: float,
                         per_epoch: bool = True) -> float:
    """CaCo's memory learning rate: linear warm-up, then cosine from ``base`` to ``final`` (constant if equal).

    Per epoch (as released), warm-up gives ``base * (e + 1) / warmup`` in epoch ``e``; per iteration,
    ``epoch`` is fractional and warm-up gives ``base * epoch / warmup``. The memory rate is not scaled with
    the batch size (upstream commented that line out).
    """
    if epoch < warmup_epochs:
        return base * ((math.floor(epoch) + 1) if per_epoch else epoch) / warmup_epochs
    if base == final:
        return base
    span = max(1e-12, total_epochs - warmup_epochs)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


@register_method()
class CaCo(Method):
    """CaCo with a learnable memory, optional multi-crop and the MoCo-style warm start of the memory.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: projector width (2048).
        proj_out_dim: embedding and memory dimension ``d`` (256).
        proj_layers: projector depth (3; BN + ReLU after the hidden layers, no last BN, no biases).
        memory_size: number of memory columns ``K`` (65536).
        temperature: ``tau`` of the encoder loss (0.08).
        memory_temperature: ``tau_m`` of the memory gradient (0.08).
        memory_lr: memory learning rate after warm-up (3.0, not batch-scaled).
        memory_lr_final: cosine target of the memory rate; equal to ``memory_lr`` means constant (3.0).
        memory_momentum: SGD momentum of the memory (0.9).
        memory_warmup_epochs: linear warm-up of the memory rate (10, the encoder's warm-up upstream).
        warm_start: fill the memory with keys before training (upstream ``--ad_init 1``).
        warm_start_temperature: InfoNCE temperature of the warm start (0.2).
        warm_start_momentum: key-encoder EMA momentum during the warm start (0.999).
        num_global_views: leading views that get keys (2); any further views are small query-only crops.
        gather_distributed: gather warm-start keys and average memory gradients over ranks.
        feature_transform: FT options for the encoder loss (``{}``: the published setting) or ``None`` (off).

    Attributes:
        projector: online projection head.
        key_encoder: ``nn.Sequential(momentum backbone, momentum projector)``.
        memory: the :class:`~contrastlab.memory.LearnableMemory`.
        memory_written: buffer, number of columns the warm start has written (``K`` when done or off).

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = CaCo(net, dim, proj_hidden_dim=32, proj_out_dim=8, memory_size=64, warm_start=False)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> out.outputs["neg_logits"].shape
        torch.Size([8, 63])
    """

    name = "caco"
    momentum_backbone = "key_encoder.0"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 256,
        proj_layers: int = 3,
        memory_size: int = 65536,
        temperature: float = 0.08,
        memory_temperature: float = 0.08,
        memory_lr: float = 3.0,
        memory_lr_final: float = 3.0,
        memory_momentum: float = 0.9,
        memory_warmup_epochs: float = 10.0,
        warm_start: bool = True,
        warm_start_temperature: float = 0.2,
        warm_start_momentum: float = 0.999,
        num_global_views: int = 2,
        gather_distributed: bool = True,
        feature_transform: dict[str, Any] | FeatureTransform | None = None,
    ) -> None:
        super().__init__(backbone, feature_dim)
        for key, value in (("temperature", temperature), ("memory_temperature", memory_temperature),
                           ("warm_start_temperature", warm_start_temperature)):
            if value <= 0:
                raise ConfigError(f"method.{key} must be positive, got {value}")
        if memory_lr < 0 or memory_lr_final < 0 or memory_warmup_epochs < 0:
            raise ConfigError("method.memory_lr, memory_lr_final and memory_warmup_epochs must be >= 0")
        if not 0.0 <= warm_start_momentum <= 1.0:
            raise ConfigError(f"method.warm_start_momentum must be in [0, 1], got {warm_start_momentum}")
        if num_global_views != 2:
            raise ConfigError(f"method.num_global_views must be 2 (CaCo pairs two global crops), got {num_global_views}")
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers, bias=False)
        self.key_encoder = nn.Sequential(momentum_copy(backbone), momentum_copy(self.projector))
        self.memory = LearnableMemory(proj_out_dim, memory_size, momentum=memory_momentum)
        self.register_buffer("memory_written", torch.tensor(0 if warm_start else memory_size, dtype=torch.long))
        self._memory_full = not warm_start  # host copy of "memory_written == K": no device read once it holds
        self.temperature = temperature
        self.memory_temperature = memory_temperature
        self.memory_lr_base = memory_lr
        self.memory_lr_final = memory_lr_final
        self.memory_warmup_epochs = memory_warmup_epochs
        self.warm_start_temperature = warm_start_temperature
        self.warm_start_momentum = warm_start_momentum
        self.gather_distributed = gather_distributed
        self.memory_lr = memory_lr  # the rate of the current epoch; set_progress moves it
        self._pending_gradient: torch.Tensor | None = None
        self._warm_start_finished = False
        self.feature_transform = build_feature_transform(feature_transform)

    # --- trainer hooks -------------------------------------------------------------------------------

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_encoder[0]), (self.projector, self.key_encoder[1])]

    @property
    def logit_temperature(self) -> float:
        return self.temperature

    def ddp_ignored_buffers(self) -> list[str]:
        return ["memory.weight", "memory.velocity"]

    def set_progress(self, epoch: float, total_epochs: int, per_epoch: bool) -> None:
        self.memory_lr = memory_learning_rate(epoch, total_epochs, base=self.memory_lr_base,
                                              final=self.memory_lr_final, warmup_epochs=self.memory_warmup_epochs,
                                              per_epoch=per_epoch)
        super().set_progress(epoch, total_epochs, per_epoch)  # the FT hook, if any

    @property
    def warming_up(self) -> bool:
        """Whether the memory is still being filled by the warm start (read from the device until it is full)."""
        if not self._memory_full:
            self._memory_full = int(self.memory_written) >= self.memory.size
        return not self._memory_full

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._memory_full = False  # the loaded memory_written decides again

    def warm_start_steps(self, global_batch: int) -> int:
        return math.ceil((self.memory.size - int(self.memory_written)) / global_batch) if self.warming_up else 0

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float) -> None:
        """Memory step with the pending gradient, then the key-encoder EMA (warm start: 0.999, then a copy)."""
        if self._pending_gradient is not None:
            self.memory.step(self._pending_gradient, self.memory_lr, self.gather_distributed)
            self._pending_gradient = None
        if self._warm_start_finished:
            for online, target in self.momentum_pairs():
                copy_params_(target.parameters(), online.parameters())
            self._warm_start_finished = False
        elif self.warming_up:
            for online, target in self.momentum_pairs():
                ema_update_(target.parameters(), online.parameters(), self.warm_start_momentum)
        else:
            super().after_optimizer_step(momentum)

    # --- the step ------------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_encoder(x), dim=1)

    def _warm_start_step(self, x1: torch.Tensor, x2: torch.Tensor) -> StepOutput:
        z = self._embed(x1)
        q = F.normalize(z, dim=1)
        k = self._key(x2)
        memory = self.memory.normalized()
        with torch.autocast(q.device.type, enabled=False):
            pos = (q.float() * k.float()).sum(dim=1, keepdim=True)
            logits = torch.cat([pos, self.memory.similarities(q, memory)], dim=1) / self.warm_start_temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
        keys = gather_no_grad(k) if self.gather_distributed else k
        written = self.memory.write(keys, int(self.memory_written))
        self.memory_written += written
        self._warm_start_finished = not self.warming_up
        detached = logits.detach()
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z.detach(), "pos_logits": detached[:, 0], "neg_logits": detached[:, 1:]},
            parts={"warm_start_info_nce": loss.detach(),
                   "memory_written": self.memory_written.detach().float()},
        )

    def _transformed_logits(self, query: torch.Tensor, positive: torch.Tensor, memory: torch.Tensor,
                            ft: FeatureTransform) -> torch.Tensor:
        """``[B, K]`` logits of the FT encoder loss: column 0 the extrapolated positive ``q'.w'_y``, then the
        ``K - 1`` interpolated negatives ``q'.n'_j``, ``j != y`` (class docstring)."""
        with torch.autocast(query.device.type, enabled=False):
            columns = memory.float().T  # [K, d]
            q, w, mixed = ft(query.float(), columns[positive], columns)[:3]
            pos = (q * w).sum(dim=1, keepdim=True)
            neg = split_positive(q @ mixed.T, positive)[1]
            return torch.cat([pos, neg], dim=1) / self.temperature

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        if self.warming_up:
            return self._warm_start_step(x1, x2)
        embeddings = [self._embed(x) for x in views]
        queries = [F.normalize(z, dim=1) for z in embeddings]
        keys = [self._key(x1), self._key(x2)]
        memory = self.memory.normalized()
        norms = self.memory.column_norms()
        sims = [self.memory.similarities(q, memory) for q in queries]
        positives = [self.memory.assign(k, memory) for k in keys]
        # (query view i, key view j): a query never takes the positive picked by its own key.
        pairs = [(i, 1 - i) for i in range(2)]
        small = [(i, j) for i in range(2, len(views)) for j in range(2)]
        groups = [pairs] if not small else [pairs, small]
        reduce = (lambda terms: sum(terms)) if not small else (lambda terms: sum(terms) / len(terms))
        loss = torch.zeros((), device=x1.device)
        gradient = torch.zeros_like(self.memory.weight)
        parts: dict[str, torch.Tensor] = {}
        ft = self.feature_transform if self.feature_transform is not None and self.feature_transform.active else None
        transformed: dict[tuple[int, int], torch.Tensor] = {}
        if ft is not None:
            transformed = {(i, j): self._transformed_logits(queries[i], positives[j], memory, ft)
                           for group in groups for i, j in group}
        for name, group in zip(("big", "mini"), groups):
            if ft is None:
                ce = [F.cross_entropy(sims[i] / self.temperature, positives[j]) for i, j in group]
            else:
                ce = [F.cross_entropy(transformed[i, j], torch.zeros_like(positives[j])) for i, j in group]
            grads = [memory_gradient(queries[i].detach(), sims[i].detach(), positives[j], memory, norms,
                                     self.memory_temperature) for i, j in group]
            loss = loss + reduce(ce)
            gradient += reduce(grads)
            parts[f"loss_{name}"] = reduce(ce).detach()
        self._pending_gradient = gradient
        s1, y1 = sims[0].detach(), positives[1]
        parts.update({
            "memory_index_acc": (s1.argmax(dim=1) == y1).float().mean() * 100.0,
            "positive_prob_tau_m": torch.softmax(s1 / self.memory_temperature, dim=1).gather(1, y1[:, None]).mean(),
            "memory_lr": torch.tensor(self.memory_lr),
            **self.memory.statistics(s1),
        })
        pos_logits, neg_logits = [], []
        for i, j in pairs:
            logits = sims[i].detach() / self.temperature
            pos, neg = split_positive(logits, positives[j])
            pos_logits.append(pos)
            neg_logits.append(neg)
        scores = {"pos_logits": torch.cat(pos_logits), "neg_logits": torch.cat(neg_logits)}
        if self.feature_transform is not None:  # the logits the loss saw, and the raw ones
            scores = {"pos_logits_raw": scores["pos_logits"], "neg_logits_raw": scores["neg_logits"], **scores}
            if ft is not None:
                seen = torch.cat([transformed[pair].detach() for pair in pairs])
                scores.update(pos_logits=seen[:, 0], neg_logits=seen[:, 1:])
        return StepOutput(
            loss=loss,
            outputs={"embeddings": embeddings[0].detach(), "keys": torch.cat(keys), **scores},
            parts=parts,
        )
