"""Test helper: make the tensor calls that wait for the device fail when given modules call them."""

from __future__ import annotations

import sys

import torch

SYNCING_METHODS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def _guarded(name: str, original, module_files: set[str]):
    def wrapper(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename in module_files:
            raise AssertionError(f"{sys._getframe(1).f_code.co_filename} called Tensor.{name}, which waits for the "
                                 "device")
        return original(*args, **kwargs)

    return wrapper


def _guarded_index(original, module_files: set[str]):
    def wrapper(self, key, *rest):
        keys = key if isinstance(key, tuple) else (key,)
        if sys._getframe(1).f_code.co_filename in module_files and any(
            isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys
        ):
            raise AssertionError("indexed with a boolean mask (a data-dependent shape)")
        return original(self, key, *rest)

    return wrapper


def forbid_host_sync(monkeypatch, *module_files: str) -> None:
    """Patch ``torch.Tensor`` so that calls from ``module_files`` to syncing methods raise AssertionError."""
    files = set(module_files)
    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, _guarded(name, getattr(torch.Tensor, name), files))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, _guarded_index(getattr(torch.Tensor, name), files))
