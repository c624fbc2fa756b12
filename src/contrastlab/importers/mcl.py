"""Mutual Contrastive Learning (Yang et al., AAAI 2022; winycg/MCL): supervised cohorts and MoCo + MCL files.

``main_cifar.py`` and ``main_imagenet.py`` save ``{"net": <the cohort's state_dict>, "acc", "epoch", "optimizer"}``
(``epoch`` the index of the last epoch trained, so ``epoch + 1`` epochs are done). The cohort is one network
holding every peer, in one of two layouts (``models/*.py``: ``<Net>_n`` for two peers, ``<Net>_b`` for four):

- independent peers: ``module_list.<i>.*``, each a whole network with its classifier;
- peers on a shared trunk: the trunk at the top level under the network's own names, then per peer the
  branch modules with a ``_<i>`` suffix (``layer2_<i>``, ``block3_<i>``, ``bn2_<i>``, ``classifier_<i>``, ...;
  HCGNet: ``layer2_HybridBlock<i>``, ``layer2_Transition<i>``, ``layer3_HybridBlock<i>``, ``norm5_<i>``,
  ``linear_<i>``).

Each family (:data:`FAMILIES`) says how its branch names read as the single network's names, how the single
network's names read as our zoo's (:mod:`contrastlab.models`: CIFAR ResNets ``downsample`` -> ``shortcut``;
WRN ``block<g>.layer.<j>`` -> ``block<g>.<j>``, ``convShortcut`` -> ``shortcut``, the final ``bn1`` -> ``bn``;
ShuffleNetV2's numbered ``conv<k>`` / ``bn<k>`` of a unit -> its ``left`` / ``right`` / ``branch`` sequences,
the last ``conv2`` / ``bn2`` -> ``conv5`` / ``bn5``; HCGNet's ``features.HybridBlock<b>.SMG<m>`` ->
``block<b>.<m-1>``, ``Transition<t>`` -> ``trans<t>`` and the gate's layers by role), and which of our
architectures a file is (from the tensors' shapes and counts).

Placed in :class:`~contrastlab.methods.MCL`: each peer's layers at ``cohort.peers.<i>.*`` (peer 0 also at
``backbone.*``; a shared trunk at every peer's name, as our cohort's state dict lists it), the classifiers at
``classifiers.<i>``. MCL's projection heads and memory banks live in its loss module, which is not saved: they
keep the fresh initialisation of our method (training from the file starts them anew, as upstream's own resume
does). ImageNet files are imported with ``method.contrast=none``, since per-sample memory banks need the training
labels; the peers and classifiers are complete either way.

``main_moco_mcl.py`` (``moco/builder_mcl.py``) saves ``{"epoch" (epochs completed), "arch", "state_dict",
"optimizer"}``; the DDP model holds per peer ``encoder_q_<i>`` and ``encoder_k_<i>`` (torchvision ResNets whose
``fc`` is the projection to 128), ``queue`` ``[M, dim, K]`` and ``queue_ptr`` ``[M]``. Placed in
:class:`~contrastlab.methods.MoCoMCL`: ``cohort.peers.<i>`` / ``projectors.<i>`` (``encoder_q_<i>``),
``key_encoder.cohort.peers.<i>`` / ``key_encoder.projectors.<i>`` (``encoder_k_<i>``), ``queues.<i>.queue``
(transposed to our ``[K, dim]``) and ``queues.<i>.ptr``. Files trained with ``--mlp`` are refused: that flag
registered the MLP under a dotted name beside the linear ``fc`` and the forward never used it, so its tensors
have no place in a model that computes what upstream computed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    OPTIMIZER_NOT_CARRIED,
    PRETRAIN,
    SUPERVISED,
    Importer,
    Released,
    plain,
    state_under,
    upstream_epoch,
)
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

HEADS_NOT_SAVED = "MCL's projection heads live in its loss module, which the release does not save: initialised"
NOT_CARRIED = OPTIMIZER_NOT_CARRIED


def _resnet_arch(net: dict[str, torch.Tensor]) -> str | None:
    """``resnet32/56/110`` (CIFAR) or ``resnet18/34`` (ImageNet) from blocks per stage and the block type.

    Raises:
        KeyError: a tensor the family always has is missing (as do the other ``_*_arch`` functions).
    """
    imagenet = net["conv1.weight"].shape[-1] == 7
    stage = "layer3." if imagenet else "layer1."  # the ImageNet ResNets differ in layer3's length
    blocks = len({k[len(stage):].split(".")[0] for k in net if k.startswith(stage)})
    bottleneck = "layer1.0.conv3.weight" in net
    table = ({(False, 2): "resnet18", (False, 6): "resnet34"} if imagenet
             else {(False, 5): "resnet32", (False, 9): "resnet56", (True, 12): "resnet110"})
    return table.get((bottleneck, blocks))


def _wrn_arch(net: dict[str, torch.Tensor]) -> str:
    """``wrn_<depth>_<k>``: ``n`` blocks per group (depth ``6n + 4``), ``16k`` channels in the first group."""
    n = len({k.split(".")[2] for k in net if k.startswith("block1.layer.")})
    return f"wrn_{6 * n + 4}_{net['block1.layer.0.conv1.weight'].shape[0] // 16}"


def _shufflenet_arch(net: dict[str, torch.Tensor]) -> str | None:
    """By the first stage's width: 48 (0.5x) or 116 (1x); the down-sampling unit's ``conv2`` gives half of it."""
    return {48: "shufflenetv2_05x", 116: "shufflenetv2_1x"}.get(2 * net["layer1.0.conv2.weight"].shape[0])


def _hcgnet_arch(net: dict[str, torch.Tensor]) -> str | None:
    """By the stem's width, twice the first growth rate: 24 (A1) or 48 (A2)."""
    return {24: "hcgnet_a1", 48: "hcgnet_a2"}.get(net["features.conv0.weight"].shape[0])


def _cifar_resnet_name(key: str) -> str:
    return key.replace(".downsample.", ".shortcut.")


def _wrn_name(key: str) -> str:
    key = re.sub(r"^block(\d)\.layer\.", r"block\1.", key).replace(".convShortcut.", ".shortcut.")
    return re.sub(r"^bn1\.", "bn.", key)


_SHUFFLE_DOWN = {1: "left.0", 2: "left.1", 3: "right.0", 4: "right.1", 5: "right.2"}  # conv<k>/bn<k> of a DownBlock


def _shufflenet_name(key: str) -> str:
    unit = re.fullmatch(r"(layer\d)\.(\d+)\.(conv|bn)(\d)\.(.*)", key)
    if unit:
        stage, index, kind, k, rest = unit.groups()
        seq = _SHUFFLE_DOWN[int(k)] if index == "0" else f"branch.{int(k) - 1}"
        return f"{stage}.{index}.{seq}.{0 if kind == 'conv' else 1}.{rest}"
    return re.sub(r"^(conv|bn)2\.", r"\g<1>5.", key)


_HCG_GATE = {"global_forget_context": "forget_context", "fc1": "forget_fc1", "bn_forget": "forget_bn",
             "fc2": "forget_fc2", "conv_3x3": "conv_3x3", "conv_5x5": "conv_5x5", "global_context3x3": "context_3x3",
             "global_context5x5": "context_5x5", "fcall": "fuse_fc", "bn_attention": "fuse_bn", "fc3x3": "fc_3x3",
             "fc5x5": "fc_5x5"}
"""HCGNet's gate layers (``_SMG`` / ``_Transition``) -> ours (:class:`~contrastlab.models.hcgnet.GatedCell`)."""
_HCG_CONV = {"norm": "0", "conv": "2"}  # BasicConv's BN and conv -> our BN-ReLU-conv Sequential


def _hcg_inner(rest: str, squeeze: str) -> str:
    layer, _, tail = rest.partition(".")
    if layer in ("conv1_1x1", "conv2_3x3"):
        part, _, tail = tail.partition(".")
        return f"{squeeze}.{0 if layer == 'conv1_1x1' else 1}.{_HCG_CONV[part]}.{tail}"
    if layer in ("conv_3x3", "conv_5x5"):
        part, _, tail = tail.partition(".")
        return f"gate.{layer}.{_HCG_CONV[part]}.{tail}"
    return f"gate.{_HCG_GATE[layer]}.{tail}"


def _hcgnet_name(key: str) -> str:
    smg = re.fullmatch(r"features\.HybridBlock(\d)\.SMG(\d+)\.(.*)", key)
    if smg:
        return f"block{smg.group(1)}.{int(smg.group(2)) - 1}.{_hcg_inner(smg.group(3), 'squeeze')}"
    trans = re.fullmatch(r"features\.Transition(\d)\.(.*)", key)
    if trans:
        return f"trans{trans.group(1)}.{_hcg_inner(trans.group(2), 'compress')}"
    return key.removeprefix("features.")


@dataclass(frozen=True)
class Family:
    """How MCL's ``models/<family>.py`` names one network family.

    Attributes:
        title: for messages.
        classifier: the single network's classifier module.
        branches: shared-trunk layout: ``(regex with groups 'peer' and 'rest', the single network's prefix)``.
        rename: the single network's key -> our zoo network's key (KeyError: a name the family does not have).
        arch: the single network's state -> our architecture name (None: not one of the release's sizes).
        archs: the architectures of our zoo this family covers (for messages).
    """

    title: str
    classifier: str
    branches: tuple[tuple[str, str], ...]
    rename: Callable[[str], str]
    arch: Callable[[dict[str, torch.Tensor]], str | None]
    archs: tuple[str, ...]


def _suffixed(*names: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """``(upstream prefix before the peer index, the single network's module)`` -> branch patterns."""
    return tuple((rf"{re.escape(up)}(?P<peer>\d+)\.(?P<rest>.*)", net) for up, net in names)


FAMILIES: dict[str, Family] = {
    "resnet": Family("CIFAR ResNet (models/resnet.py)", "classifier",
                     _suffixed(("layer2_", "layer2"), ("layer3_", "layer3"), ("classifier_", "classifier")),
                     _cifar_resnet_name, _resnet_arch, ("resnet32", "resnet56", "resnet110")),
    "resnet_imagenet": Family("ImageNet ResNet (models/resnet_imagenet.py)", "fc",
                              _suffixed(("layer3_", "layer3"), ("layer4_", "layer4"), ("classifier_", "fc")),
                              str, _resnet_arch, ("resnet18", "resnet34")),
    "wrn": Family("WideResNet (models/wrn.py)", "fc",
                  _suffixed(("block2_", "block2"), ("block3_", "block3"), ("bn_", "bn1"), ("classifier_", "fc")),
                  _wrn_name, _wrn_arch, ("wrn_16_2", "wrn_40_2", "wrn_28_4")),
    "shufflenet": Family("ShuffleNetV2 (models/shufflenetv2.py)", "linear",
                         _suffixed(("layer2_", "layer2"), ("layer3_", "layer3"), ("conv2_", "conv2"), ("bn2_", "bn2"),
                                   ("classifier_", "linear")),
                         _shufflenet_name, _shufflenet_arch, ("shufflenetv2_05x", "shufflenetv2_1x")),
    "hcgnet": Family("HCGNet (models/hcgnet.py)", "classifier",
                     _suffixed(("layer2_HybridBlock", "features.HybridBlock2"),
                               ("layer2_Transition", "features.Transition2"),
                               ("layer3_HybridBlock", "features.HybridBlock3"), ("norm5_", "features.norm5"),
                               ("linear_", "classifier")),
                     _hcgnet_name, _hcgnet_arch, ("hcgnet_a1", "hcgnet_a2")),
}
"""MCL's network families in released cohorts, by our name for them."""

_MARKERS = (("hcgnet", "features.conv0.weight"), ("wrn", "block1.layer.0.conv1.weight"),
            ("shufflenet", "layer1.0.conv5.weight"), ("resnet", "layer1.0.conv1.weight"))
"""A key of the single network (or of the shared trunk) that only that family has, checked in this order."""

RECIPE_NAMES = {"resnet32": "r32", "resnet56": "r56", "resnet110": "r110", "resnet18": "r18", "resnet34": "r34",
                "wrn_16_2": "wrn16_2", "wrn_40_2": "wrn40_2", "wrn_28_4": "wrn28_4",
                "shufflenetv2_05x": "shufflev2_05x", "shufflenetv2_1x": "shufflev2_1x", "hcgnet_a1": "hcgnet_a1",
                "hcgnet_a2": "hcgnet_a2"}
"""Our architecture -> its token in the MCL recipe names (``cifar100/mcl_x2_wrn16_2_300ep``)."""


def _family(trunk: dict[str, torch.Tensor]) -> str | None:
    """The family of a single network's (or a shared trunk's) tensors, by :data:`_MARKERS`."""
    for name, marker in _MARKERS:
        if marker in trunk:
            stem = trunk.get("conv1.weight")
            return "resnet_imagenet" if name == "resnet" and stem is not None and stem.shape[-1] == 7 else name
    return None


def _split(state: dict[str, torch.Tensor]) -> tuple[str, str | None, dict[str, tuple[int | None, str]]]:
    """The layout, the family and, per upstream key, ``(peer or None for the shared trunk, the single network's
    key)``."""
    listed = {k: re.fullmatch(r"module_list\.(\d+)\.(.*)", k) for k in state}
    if any(listed.values()):
        odd = [k for k, m in listed.items() if m is None]
        if odd:
            raise CheckpointError(f"keys outside module_list.<i>.* in an independent cohort: {odd[:5]}")
        first = {m.group(2): state[k] for k, m in listed.items() if m and m.group(1) == "0"}
        return "independent", _family(first), {k: (int(m.group(1)), m.group(2)) for k, m in listed.items() if m}
    family = _family(state)  # the shared trunk sits at the top level under the network's own names
    split: dict[str, tuple[int | None, str]] = {}
    for key in state:
        for pattern, net in FAMILIES[family].branches if family else ():
            m = re.fullmatch(pattern, key)
            if m:
                split[key] = (int(m.group("peer")), f"{net}.{m.group('rest')}")
                break
        else:
            split[key] = (None, key)
    return "shared", family, split


@register_importer()
class MCLImporter(Importer):
    """winycg/MCL ``.pth.tar`` files: supervised cohorts and MoCo + MCL (see the module docstring)."""

    name = "mcl"
    project = "winycg/MCL"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        if "net" not in raw:
            if isinstance(raw.get("state_dict"), dict):
                return self._moco(raw, path)
            raise CheckpointError(f"{path}: MCL's main_cifar.py / main_imagenet.py files hold the cohort under 'net', "
                                  f"main_moco_mcl.py files under 'state_dict'; top-level keys found: {sorted(raw)}")
        state = state_under(raw, "net", path)
        try:
            layout, family, split = _split(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        peers = sorted({p for p, _ in split.values() if p is not None})
        # peer 0's network in the single network's names (with the shared trunk)
        net = {name: state[k] for k, (p, name) in split.items() if p in (0, None)}
        if len(peers) < 2 or family is None:
            raise CheckpointError(f"{path}: not a cohort of MCL's networks (module_list.<i>.* or a shared trunk with "
                                  f"per-peer branches of a ResNet, WRN, ShuffleNetV2 or HCGNet); first keys: "
                                  f"{list(state)[:5]}")
        spec = FAMILIES[family]
        try:
            arch = spec.arch(net)
        except KeyError as exc:
            raise CheckpointError(f"{path}: a cohort of {spec.title} networks without {exc}; the file is incomplete or "
                                  "not MCL's") from None
        if arch not in spec.archs:
            raise CheckpointError(f"{path}: a cohort of {spec.title} networks of a size ({arch or 'unrecognised'}) "
                                  f"that is not one of the release's: {', '.join(spec.archs)}")
        info = {"acc": plain(raw.get("acc")), "peers": len(peers), "peer_layout": layout, "family": family,
                "imagenet": family == "resnet_imagenet"}
        other = {k: NOT_CARRIED if k == "optimizer" else "kept in the imported record" for k in raw if k != "net"}
        return Released(path, raw, state, SUPERVISED, layout, upstream_epoch(raw, completed_offset=1), arch, info,
                        other)

    def _moco(self, raw: dict[str, Any], path: Path) -> Released:
        state = state_under(raw, "state_dict", path)
        peers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder_q_(\d+)\.", k))})
        if len(peers) < 2 or "queue" not in state:
            raise CheckpointError(f"{path}: a main_moco_mcl.py file holds encoder_q_<i>.*, encoder_k_<i>.*, queue "
                                  f"and queue_ptr for two or more peers; first keys: {list(state)[:5]}")
        dotted = [k for k in state if re.match(r"encoder_[qk]_\d+\.fc\.\d+\.", k)]
        if dotted:
            raise CheckpointError(f"{path}: trained with --mlp ({dotted[0]!r}, ...): main_moco_mcl.py registered that "
                                  "MLP beside the linear fc and never ran it, so these tensors have no place in a "
                                  "model that computes what upstream computed; only files without --mlp (the "
                                  "released setting) import")
        arch = raw.get("arch") if isinstance(raw.get("arch"), str) else "resnet18"
        other = {k: NOT_CARRIED if k == "optimizer" else "kept in the imported record" for k in raw
                 if k != "state_dict"}
        return Released(path, raw, state, PRETRAIN, "moco_mcl", upstream_epoch(raw), arch, {"peers": len(peers)},
                        other)

    def default_recipe(self, released: Released) -> str:
        from contrastlab.config.load import recipe_names

        peers = released.info["peers"]
        if released.layout == "moco_mcl":
            return "imagenet/moco_mcl_x2_r18_200ep"
        dataset, epochs = ("imagenet", "90ep") if released.info["imagenet"] else ("cifar100", "300ep")
        own = f"{dataset}/mcl_x{peers}_{RECIPE_NAMES[released.arch]}_{epochs}"
        # no recipe of its own (e.g. MCL(x2) WRN-28-4, or a cohort of 3): the same training of the dataset's ResNet,
        # model.arch and model.peers set by the overrides
        shared = 4 if released.layout == "shared" else 2
        fallback = f"{dataset}/mcl_x{shared}_{'r18' if released.info['imagenet'] else 'r32'}_{epochs}"
        return own if own in recipe_names() else fallback

    def overrides(self, released: Released) -> list[str]:
        peers = f"model.peers={released.info['peers']}"
        if released.layout == "moco_mcl":
            return [*super().overrides(released), peers, "model.shared_until=null"]
        shared = "null" if released.layout == "independent" else "upstream"
        extra = [peers, f"model.shared_until={shared}"]
        if released.info["imagenet"]:
            extra.append("method.contrast=none")
        return [*super().overrides(released), *extra]

    def num_classes(self, released: Released) -> int:
        if released.layout == "moco_mcl":
            return 1
        classifier = FAMILIES[released.info["family"]].classifier
        _, _, split = _split(released.state)
        key = next(k for k, (p, name) in split.items() if p == 0 and name == f"{classifier}.weight")
        return int(released.state[key].shape[0])

    def place(self, released: Released, placement: Placement) -> None:
        if released.layout == "moco_mcl":
            self._place_moco(released, placement)
            return
        peers, spec = released.info["peers"], FAMILIES[released.info["family"]]
        _, _, split = _split(released.state)
        for key, (peer, name) in split.items():
            head = re.fullmatch(rf"{spec.classifier}\.(weight|bias)", name)
            if head and peer is not None:
                placement.put(key, f"classifiers.{peer}.{head.group(1)}")
                continue
            try:
                ours = spec.rename(name)
            except KeyError:
                raise CheckpointError(f"{placement.where}: {key!r} is not a name of MCL's {spec.title}") from None
            owners = range(peers) if peer is None else [peer]  # a shared trunk: under every peer's name
            placement.put(key, [f"cohort.peers.{i}.{ours}" for i in owners] + ([f"backbone.{ours}"] if 0 in owners
                                                                               else []))
        placement.keep_initial("embeds.*", HEADS_NOT_SAVED)
        placement.keep_initial("banks.*", "MCL's memory banks are not saved by the release: initialised")

    def _place_moco(self, released: Released, placement: Placement) -> None:
        for i in range(released.info["peers"]):
            for side, ours in (("q", ""), ("k", "key_encoder.")):
                placement.put_prefix(f"encoder_{side}_{i}.fc.", f"{ours}projectors.{i}.0.")
                placement.put_prefix(f"encoder_{side}_{i}.", [f"{ours}cohort.peers.{i}."]
                                     + (["backbone."] if i == 0 and side == "q" else []))
            placement.put("queue", f"queues.{i}.queue", transform=lambda q, i=i: q[i].t())
            placement.placed[f"queues.{i}.queue"] = f"queue[{i}] transposed"
            placement.put("queue_ptr", f"queues.{i}.ptr", transform=lambda p, i=i: p[i])
