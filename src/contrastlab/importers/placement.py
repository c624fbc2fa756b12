"""Placing a released checkpoint's tensors into our method's state dict, with an account of every key.

:class:`Placement` is the bookkeeping of one conversion. An importer moves upstream tensors to our keys
(:meth:`Placement.put`, :meth:`Placement.put_prefix`, :meth:`Placement.fold_bias`) or to another entry of
our checkpoint (:meth:`Placement.take`: a linear probe's classifier), and fills the keys of ours that the file
does not hold, each with the reason (:meth:`Placement.keep_initial`, :meth:`Placement.copy_ours`,
:meth:`Placement.fill`). :meth:`Placement.finish` then refuses the conversion if an upstream key was not placed
(a :class:`~contrastlab.errors.CheckpointError` naming it), if one of our keys got nothing, or if a shape
differs; nothing is silently left behind. (Top-level entries of a file that hold no weights, such as the
optimizer state, are accounted for by the importer: :attr:`~contrastlab.importers.base.Released.other`.)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from contrastlab.errors import CheckpointError


@dataclass
class Placement:
    """One conversion: upstream tensors in, our state dict out (see the module docstring).

    Args:
        source: the upstream tensors (already stripped of a ``module.`` prefix).
        target: our freshly built method's state dict (names, shapes, initial values).
        where: the file, for messages.

    Attributes:
        placed: our key -> the upstream key (or description) it came from.
        elsewhere: upstream key -> where in our checkpoint it went outside the method (the stored classifier).
        initial: our key -> why it keeps the value of the freshly built model.
    """

    source: Mapping[str, torch.Tensor]
    target: Mapping[str, torch.Tensor]
    where: str = "the checkpoint"
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    placed: dict[str, str] = field(default_factory=dict)
    initial: dict[str, str] = field(default_factory=dict)
    elsewhere: dict[str, str] = field(default_factory=dict)
    _used: set[str] = field(default_factory=set)

    def has(self, key: str) -> bool:
        """Whether the upstream file holds ``key``."""
        return key in self.source

    def keys(self, prefix: str = "") -> list[str]:
        """Upstream keys starting with ``prefix``, in file order."""
        return [k for k in self.source if k.startswith(prefix)]

    def put(self, src: str, dst: str | Iterable[str], transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
            ) -> None:
        """Place upstream ``src`` at our key ``dst`` (or at each of several keys: a shared trunk)."""
        if src not in self.source:
            raise CheckpointError(f"{self.where}: expected key {src!r} is missing; this is not the layout the "
                                  "importer reads (pass the right --from, or see docs/importing.md)")
        value = self.source[src] if transform is None else transform(self.source[src])
        for key in [dst] if isinstance(dst, str) else list(dst):
            if key not in self.target:
                raise CheckpointError(f"{self.where}: {src!r} cannot be placed: it maps to {key!r}, which the model "
                                      "built from the recipe does not have. Nothing was written. Choose the recipe "
                                      "matching this file with --recipe (see docs/importing.md)")
            if key in self.out:
                raise CheckpointError(f"{self.where}: both {self.placed[key]!r} and {src!r} map to {key!r}")
            if tuple(value.shape) != tuple(self.target[key].shape):
                raise CheckpointError(f"{self.where}: {src!r} has shape {list(value.shape)} but {key!r} of the model "
                                      f"built from the recipe has {list(self.target[key].shape)}; choose the recipe "
                                      "(or model.* / method.* overrides) matching this file")
            self.out[key] = value.detach().clone().to(self.target[key].dtype)
            self.placed[key] = src
        self._used.add(src)

    def put_prefix(self, src_prefix: str, dst_prefix: str | Iterable[str], skip: Iterable[str] = ()) -> int:
        """Place every upstream key under ``src_prefix`` at the same name under ``dst_prefix`` (or each of several);
        keys under a prefix in ``skip`` are left for another rule. Returns how many keys were placed."""
        prefixes = [dst_prefix] if isinstance(dst_prefix, str) else list(dst_prefix)
        skip = tuple(skip)
        count = 0
        for key in self.keys(src_prefix):
            rest = key[len(src_prefix):]
            if key in self._used or (skip and rest.startswith(skip)):
                continue
            self.put(key, [p + rest for p in prefixes])
            count += 1
        return count

    def fold_bias(self, linear: str, bn: str, dst_linear: str, dst_bn: str) -> None:
        """A Linear with a bias followed by BatchNorm, into our bias-free Linear and that BatchNorm.

        BatchNorm subtracts the mean of its input, so the bias only moves that mean: in training the batch mean
        cancels it, in evaluation ``BN(Wx + b)`` with running mean ``mu`` equals ``BN(Wx)`` with running mean
        ``mu - b``. The weight goes to ``dst_linear``, the bias into ``dst_bn``'s running mean; every other
        BatchNorm tensor is placed as it is.
        """
        self.put(f"{linear}.weight", f"{dst_linear}.weight")
        bias = self.source.get(f"{linear}.bias")
        if bias is None:
            raise CheckpointError(f"{self.where}: expected key {linear + '.bias'!r} is missing")
        self._used.add(f"{linear}.bias")
        self.put(f"{bn}.running_mean", f"{dst_bn}.running_mean", transform=lambda mu: mu - bias)
        self.placed[f"{dst_bn}.running_mean"] = f"{bn}.running_mean - {linear}.bias (bias folded)"
        for key in self.keys(f"{bn}."):
            if key not in self._used:
                self.put(key, dst_bn + key[len(bn):])

    def take(self, src: str, where: str) -> torch.Tensor:
        """Mark upstream ``src`` as placed outside the method's state (``where``, e.g. the stored classifier)."""
        if src not in self.source:
            raise CheckpointError(f"{self.where}: expected key {src!r} is missing")
        self._used.add(src)
        self.elsewhere[src] = where
        return self.source[src].detach().clone()

    def keep_initial(self, pattern: str, why: str) -> int:
        """Keep the freshly built model's value for our keys matching glob ``pattern`` (the file has none)."""
        matched = [k for k in self.target if k not in self.out and fnmatch.fnmatchcase(k, pattern)]
        for key in matched:
            self.out[key] = self.target[key].detach().clone()
            self.initial[key] = why
        return len(matched)

    def fill(self, dst: str, value: torch.Tensor, why: str) -> None:
        """Set our key ``dst`` to a value derived from the file rather than read from it (``why`` says how)."""
        if dst not in self.target:
            raise CheckpointError(f"{self.where}: the model built from the recipe has no {dst!r}; check --recipe")
        self.out[dst] = torch.as_tensor(value, dtype=self.target[dst].dtype).reshape(self.target[dst].shape).clone()
        self.initial[dst] = why

    def copy_ours(self, src_prefix: str, dst_prefix: str, why: str) -> None:
        """Fill our keys under ``dst_prefix`` from our own already placed keys under ``src_prefix`` (a momentum
        encoder started as a copy of the online one, when the file has no momentum encoder)."""
        for key in [k for k in self.target if k.startswith(dst_prefix) and k not in self.out]:
            origin = src_prefix + key[len(dst_prefix):]
            if origin not in self.out:
                raise CheckpointError(f"{self.where}: cannot fill {key!r} from {origin!r}, which was not placed")
            self.out[key] = self.out[origin].clone()
            self.initial[key] = why

    def finish(self) -> dict[str, torch.Tensor]:
        """Our complete state dict; CheckpointError for an upstream key not accounted for or a key of ours unfilled."""
        unplaced = [k for k in self.source if k not in self._used]
        if unplaced:
            raise CheckpointError(f"{self.where}: {len(unplaced)} key(s) cannot be placed in the model built from the "
                                  f"recipe: {_listed(unplaced)}. Nothing was written. Check --from and --recipe (and model.* / "
                                  "method.* overrides); see docs/importing.md for the layouts each importer reads")
        missing = [k for k in self.target if k not in self.out]
        if missing:
            raise CheckpointError(f"{self.where}: the file holds nothing for {len(missing)} key(s) of the model built "
                                  f"from the recipe: {_listed(missing)}. Nothing was written. Check --recipe (and model.* / "
                                  "method.* overrides) against the file")
        return {k: self.out[k] for k in self.target}

    def summary(self) -> dict[str, object]:
        """Counts and reasons, for the log and the checkpoint's ``imported`` record."""
        kept: dict[str, list[str]] = {}
        for key, why in self.initial.items():
            kept.setdefault(why, []).append(key)
        return {"placed": len(self.placed), "elsewhere": dict(self.elsewhere),
                "initial": {why: len(keys) for why, keys in kept.items()}}


def _listed(keys: list[str], most: int = 8) -> str:
    """The first ``most`` keys for a message, and how many more there are."""
    return ", ".join(repr(k) for k in keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")
