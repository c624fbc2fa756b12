"""Mutual Contrastive Learning (Yang et al., AAAI 2022; winycg/MCL): supervised cohorts of CIFAR and ImageNet nets.

``main_cifar.py`` and ``main_imagenet.py`` save ``{"net": <the cohort's state_dict>, "acc", "epoch", "optimizer"}``
(``epoch`` the index of the last epoch trained, so ``epoch + 1`` epochs are done). The cohort is one network
holding every peer, in one of two layouts:

- two peers, independent (``resnet32`` etc. with ``--number-net 2``: ``ResNet_n``): ``module_list.<i>.*``, each a
  whole network with its classifier (``classifier`` on CIFAR, ``fc`` on ImageNet);
- four peers on a shared trunk (``ResNet_b``): the trunk at the top level (CIFAR: ``conv1``, ``bn1``, ``layer1``;
  ImageNet: through ``layer2``), then per peer ``layer2_<i>`` / ``layer3_<i>`` (CIFAR) or ``layer3_<i>`` /
  ``layer4_<i>`` (ImageNet) and ``classifier_<i>``.

Placed in :class:`~contrastlab.methods.MCL`: each peer's layers at ``cohort.peers.<i>.*`` (peer 0 also at
``backbone.*``; a shared trunk at every peer's name, as our cohort's state dict lists it), the classifiers at
``classifiers.<i>``. The CIFAR ResNets' ``downsample`` is our ``shortcut``; the ImageNet ResNets are named as
torchvision's. MCL's projection heads and memory banks live in its loss module, which is not saved: they keep
the fresh initialisation of our method (training from the file starts them anew, as upstream's own resume does).
ImageNet files are imported with ``method.contrast=none``, since per-sample memory banks need the training
labels; the peers and classifiers are complete either way.

Architectures: the CIFAR ResNets (``resnet32``, ``resnet56``, ``resnet110``) and the ImageNet ResNets
(``resnet18``, ``resnet34``). The WideResNets, ShuffleNetV2s and HCGNets of the release are recognised and refused
with a message (their module names differ from ours and have no tested mapping yet).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import SUPERVISED, Importer, Released, plain, state_under, upstream_epoch
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

CIFAR_DEPTHS = {(False, 5): "resnet32", (False, 9): "resnet56", (True, 12): "resnet110"}
IMAGENET_DEPTHS = {(False, 2): "resnet18", (False, 6): "resnet34"}
RECIPE_NAMES = {"resnet32": "r32", "resnet56": "r56", "resnet110": "r110", "resnet18": "r18", "resnet34": "r34"}
HEADS_NOT_SAVED = "MCL's projection heads live in its loss module, which the release does not save: initialised"


def _peer_views(state: dict[str, Any]) -> tuple[str, int]:
    """``("independent" | "shared", number of peers)`` of a cohort state dict."""
    listed = {int(m.group(1)) for k in state if (m := re.match(r"module_list\.(\d+)\.", k))}
    if listed:
        return "independent", len(listed)
    branches = {int(m.group(1)) for k in state if (m := re.match(r"classifier_(\d+)\.", k))}
    return "shared", len(branches)


@register_importer()
class MCLImporter(Importer):
    """winycg/MCL ``.pth.tar`` files of supervised cohorts (see the module docstring)."""

    name = "mcl"
    project = "winycg/MCL"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        if "net" not in raw:
            raise CheckpointError(f"{path}: MCL's main_cifar.py / main_imagenet.py files hold the cohort under 'net'; "
                                  f"top-level keys found: {sorted(raw)} (files of main_moco_mcl.py are not imported "
                                  "yet)")
        state = state_under(raw, "net", path)
        layout, peers = _peer_views(state)
        if peers < 2:
            raise CheckpointError(f"{path}: neither module_list.<i>.* (independent peers) nor classifier_<i>.* "
                                  f"(shared trunk) found; first keys: {list(state)[:5]}")
        first = "module_list.0." if layout == "independent" else ""
        conv1 = state.get(f"{first}conv1.weight")
        if conv1 is None:
            families = {"wrn": "block1.", "shufflenet": "stage", "hcgnet": "transition"}
            named = [f for f, marker in families.items() if any(marker in k for k in state)]
            raise CheckpointError(f"{path}: a cohort of {named[0] if named else 'unrecognised'} networks; importing is "
                                  "implemented for MCL's CIFAR ResNets (resnet32/56/110) and ImageNet ResNets "
                                  "(resnet18/34) only")
        imagenet = conv1.shape[-1] == 7
        # blocks per stage: every stage of the CIFAR ResNets has as many; the ImageNet ones differ in layer3
        stage = f"{first}{'layer1' if not imagenet else 'layer3' if layout == 'independent' else 'layer3_0'}."
        blocks = len({k[len(stage):].split(".")[0] for k in state if k.startswith(stage)})
        bottleneck = any(k.startswith(f"{first}layer1.0.conv3.") for k in state)
        arch = (IMAGENET_DEPTHS if imagenet else CIFAR_DEPTHS).get((bottleneck, blocks))
        if arch is None:
            raise CheckpointError(f"{path}: a ResNet with {blocks} blocks per stage is not one of MCL's "
                                  f"{'ImageNet' if imagenet else 'CIFAR'} ResNets")
        info = {"acc": plain(raw.get("acc")), "peers": peers, "peer_layout": layout, "imagenet": imagenet}
        other = {k: "not carried over: a resumed run starts with fresh optimizer state" if k == "optimizer"
                 else "kept in the imported record" for k in raw if k != "net"}
        return Released(path, raw, state, SUPERVISED, layout, upstream_epoch(raw, completed_offset=1), arch, info,
                        other)

    def default_recipe(self, released: Released) -> str:
        peers = released.info["peers"]
        dataset, epochs = ("imagenet", "90ep") if released.info["imagenet"] else ("cifar100", "300ep")
        return f"{dataset}/mcl_x{peers}_{RECIPE_NAMES[released.arch]}_{epochs}"

    def overrides(self, released: Released) -> list[str]:
        shared = "null" if released.layout == "independent" else "upstream"
        extra = [f"model.peers={released.info['peers']}", f"model.shared_until={shared}"]
        if released.info["imagenet"]:
            extra.append("method.contrast=none")
        return [*super().overrides(released), *extra]

    def num_classes(self, released: Released) -> int:
        key = next(k for k in released.state if re.fullmatch(r"(module_list\.0\.(classifier|fc)|classifier_0)\.weight", k))
        return int(released.state[key].shape[0])

    def place(self, released: Released, placement: Placement) -> None:
        peers, imagenet = released.info["peers"], released.info["imagenet"]

        def ours(peer: int, rest: str) -> list[str]:
            rest = rest if imagenet else rest.replace(".downsample.", ".shortcut.")
            return [f"cohort.peers.{peer}.{rest}"] + ([f"backbone.{rest}"] if peer == 0 else [])

        for key in placement.keys(""):
            if released.layout == "independent":
                peer, rest = re.match(r"module_list\.(\d+)\.(.*)", key).groups()  # type: ignore[union-attr]
                head = re.fullmatch(r"(classifier|fc)\.(weight|bias)", rest)
                placement.put(key, f"classifiers.{peer}.{head.group(2)}" if head else ours(int(peer), rest))
                continue
            branch = re.fullmatch(r"(layer\d)_(\d+)\.(.*)", key)
            head = re.fullmatch(r"classifier_(\d+)\.(weight|bias)", key)
            if head:
                placement.put(key, f"classifiers.{head.group(1)}.{head.group(2)}")
            elif branch:
                placement.put(key, ours(int(branch.group(2)), f"{branch.group(1)}.{branch.group(3)}"))
            else:  # the shared trunk: the same tensors under every peer's name
                placement.put(key, [name for peer in range(peers) for name in ours(peer, key)])
        placement.keep_initial("embeds.*", HEADS_NOT_SAVED)
        placement.keep_initial("banks.*", "MCL's memory banks are not saved by the release: initialised")
