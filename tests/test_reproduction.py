"""Recipes named after a published row train what produced it: each setting checked through the resolved config.

The expected values are read from the upstream commands and configs cited in each test (moco-v3 CONFIG.md,
ContrastiveCrop ``configs/``, FT's ``main_linear.py`` and README, MCL's scripts, DeiT's ``main.py``), never
from the recipes themselves.
"""

from __future__ import annotations

import re

from contrastlab.config.load import load_config, recipe_names

EPOCHS_IN_NAME = re.compile(r"_(\d+)ep(?:_|$)")


def _epochs(recipe: str) -> int:
    """The epochs a recipe resolves to: pre-training, or the protocol of a linear-probe recipe."""
    cfg = load_config(recipe)
    if recipe.startswith("linear/"):
        return cfg.linear.epochs
    return cfg.train.epochs


def test_every_recipe_named_n_epochs_resolves_to_n_epochs() -> None:
    """``<...>_<N>ep[_...]`` in a recipe's name is a promise (the MoCo v3 ViT recipes once inherited 100 of 300)."""
    named = {name: int(m.group(1)) for name in recipe_names()
             if (m := EPOCHS_IN_NAME.search(name.rsplit("/", 1)[-1]))}
    assert len(named) > 100
    resolved = {name: _epochs(name) for name in named}
    wrong = {name: (n, resolved[name]) for name, n in named.items() if resolved[name] != n}
    assert not wrong, f"recipe: (epochs in the name, epochs resolved): {wrong}"
