"""Peer cohorts for Mutual Contrastive Learning: M peers, independent or on one shared trunk.

Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022
(github.com/winycg/MCL). Upstream ties the layout to the number of peers: two peers
are always independent networks, four peers always share a trunk (ONE-style, Lan et al. 2018). Here the
two settings are separate: ``num_peers`` says how many peers, ``shared_until`` where the shared trunk
ends (``None``: nothing is shared; a stage name of :mod:`contrastlab.models.staged`; or ``"upstream"``
for the split point upstream uses for that family:

============================  ==============  =========================================
family                        ``"upstream"``  shared trunk
============================  ==============  =========================================
CIFAR ResNet (resnet32/...)   ``layer1``      conv1 + BN + layer1
WideResNet (wrn_*)            ``block1``      conv1 + block1
ShuffleNetV2 (shufflenetv2_*) ``layer1``      conv1 + BN + layer1
HCGNet (hcgnet_*)             ``trans1``      conv0 + HybridBlock1 + Transition1
ImageNet ResNet (resnet18/..) ``layer2``      conv1 through layer2
============================  ==============  =========================================

How the trunk is shared: :func:`build_cohort` builds M complete, independently initialised backbones
and then points the trunk attributes of peers 1..M-1 at peer 0's modules. Each branch therefore keeps
its own initialisation (nothing is deep-copied), and :meth:`Cohort.peer` is an ordinary backbone of
its family (same class, same ``state_dict`` keys, same forward), ready for kNN, linear probing or
export. ``Cohort.parameters()`` lists every shared parameter once; ``Cohort.state_dict()`` holds the
trunk under each peer's prefix (the entries are the same tensors). The cohort's forward runs the trunk
once and each branch on its output, so the trunk's BatchNorm statistics see each batch once and its
gradient is the sum of every branch's. Stages are looked up at call time, so module swaps such as
``nn.SyncBatchNorm.convert_sync_batchnorm`` (which keeps the shared parameters and buffers shared) and
deep copies (momentum encoders) keep working.

Example:
    >>> cohort = build_cohort("resnet32", num_peers=4, shared_until="upstream")
    >>> cohort.shared_until
    'layer1'
    >>> [f.shape for f in cohort(torch.randn(2, 3, 32, 32))]
    [torch.Size([2, 64]), torch.Size([2, 64]), torch.Size([2, 64]), torch.Size([2, 64])]
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.models.backbones import build_backbone
from contrastlab.models.staged import FLATTEN, named_stages, run_stages, stage_spec, upstream_shared_until

__all__ = ["UPSTREAM", "Cohort", "build_cohort"]

UPSTREAM = "upstream"
"""``shared_until`` value that picks the family's upstream MCL split point."""


def _hint(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class Cohort(nn.Module):
    """``num_peers`` backbones of one architecture, optionally sharing their first stages.

    Args:
        peers: independently initialised backbones of the same class (staged, see
            :mod:`contrastlab.models.staged`). With a shared trunk, the trunk modules of ``peers[1:]``
            are replaced by those of ``peers[0]`` (the networks are modified in place).
        feature_dim: dimension of each peer's features.
        shared_until: ``None`` (independent peers), the last stage of the shared trunk, or
            ``"upstream"`` (the family's upstream MCL split point).

    Attributes:
        num_peers: number of peers M.
        feature_dim: dimension of each peer's features.
        shared_until: the last shared stage (``"upstream"`` resolved to a stage name), or ``None``.
        peers: the M backbones (``nn.ModuleList``); with a shared trunk they hold the same trunk modules.

    Raises:
        ConfigError: no peers, a module repeated, peers of different classes, or an unknown or invalid
            ``shared_until``.
    """

    def __init__(self, peers: Sequence[nn.Module], feature_dim: int, shared_until: str | None = None) -> None:
        super().__init__()
        if len(peers) < 1:
            raise ConfigError("a cohort needs at least one peer (num_peers >= 1)")
        if len({id(p) for p in peers}) != len(peers):
            raise ConfigError("cohort peers must be separately built networks, not the same module repeated")
        kinds = {type(p) for p in peers}
        if len(kinds) != 1:
            got = ", ".join(sorted(k.__name__ for k in kinds))
            raise ConfigError(f"cohort peers must share one architecture, got {got}")
        spec = stage_spec(peers[0])
        names = [name for name, _ in spec]
        if shared_until == UPSTREAM:
            shared_until = upstream_shared_until(peers[0])
        split = 0
        if shared_until is not None:
            valid = self._valid_split_points(peers[0])
            if shared_until not in valid:
                raise ConfigError(
                    f"shared_until={shared_until!r}{_hint(shared_until, valid)} is not a stage of "
                    f"{type(peers[0]).__name__} that leaves each peer some parameters; valid values: "
                    f"None, {UPSTREAM!r}, {', '.join(repr(v) for v in valid)} (stages: {', '.join(names)})"
                )
            split = names.index(shared_until) + 1
            trunk_attributes = [a for _, attributes in spec[:split] for a in attributes if a != FLATTEN]
            for peer in peers[1:]:
                for attribute in trunk_attributes:
                    setattr(peer, attribute, getattr(peers[0], attribute))
        self.peers = nn.ModuleList(peers)
        self.num_peers = len(peers)
        self.feature_dim = feature_dim
        self.shared_until = shared_until
        self._split = split  # number of shared stages

    @staticmethod
    def _valid_split_points(net: nn.Module) -> list[str]:
        """Stages after which every remaining part of ``net`` still owns parameters."""
        stages = named_stages(net)
        valid = []
        for k, (name, _) in enumerate(stages):
            if any(p.numel() for _, m in stages[k + 1:] for p in m.parameters()):
                valid.append(name)
        return valid

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every peer: a list of M tensors ``[B, feature_dim]``."""
        if self._split == 0:
            return [peer(x) for peer in self.peers]
        x = run_stages(self.peers[0], x, stop=self._split)
        return [run_stages(peer, x, start=self._split) for peer in self.peers]

    def peer(self, i: int) -> nn.Module:
        """Peer ``i`` as a backbone: images -> its features, through the shared trunk if there is one."""
        if not 0 <= i < self.num_peers:
            raise IndexError(f"peer index {i} out of range for a cohort of {self.num_peers}")
        return self.peers[i]

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Parameters of the shared trunk (empty for independent peers)."""
        stages = named_stages(self.peers[0])[: self._split]
        return [p for _, stage in stages for p in stage.parameters()]

    def branch_parameters(self, i: int) -> list[nn.Parameter]:
        """Parameters that only peer ``i`` uses (all of its parameters for independent peers)."""
        shared = {id(p) for p in self.trunk_parameters()}
        return [p for p in self.peer(i).parameters() if id(p) not in shared]

    def extra_repr(self) -> str:
        return (
            f"num_peers={self.num_peers}, feature_dim={self.feature_dim}, shared_until={self.shared_until!r}"
        )


def build_cohort(
    arch: str, num_peers: int, shared_until: str | None = None, **backbone_kwargs: object
) -> Cohort:
    """Build a :class:`Cohort` of ``num_peers`` backbones ``arch``.

    Trunk sharing is set by ``shared_until`` alone, never by ``num_peers``: upstream's "MCL(x4)" is
    ``build_cohort(arch, 4, shared_until="upstream")``, its "MCL(x2)" ``build_cohort(arch, 2)``.

    Args:
        arch: a name of :data:`contrastlab.models.BACKBONES`.
        num_peers: M >= 1.
        shared_until: ``None`` (independent peers), a stage name of ``arch`` (that stage and the ones
            before it form the shared trunk), or ``"upstream"`` (arXiv 2104.12565; github.com/winycg/MCL).
        **backbone_kwargs: passed to :func:`contrastlab.models.build_backbone` for every peer
            (``cifar_stem``, ``width``, ...).

    Returns:
        the cohort; each peer's branch (and, without sharing, each whole peer) is initialised
        independently.

    Raises:
        ConfigError: unknown ``arch``, bad ``num_peers`` or an unknown ``shared_until``.

    Example:
        >>> cohort = build_cohort("wrn_16_2", num_peers=2)
        >>> cohort.num_peers, cohort.feature_dim, cohort.shared_until
        (2, 128, None)
    """
    if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 1:
        raise ConfigError(f"num_peers must be an integer >= 1, got {num_peers!r}")
    built = [build_backbone(arch, **backbone_kwargs) for _ in range(num_peers)]  # type: ignore[arg-type]
    return Cohort([net for net, _ in built], built[0][1], shared_until)
