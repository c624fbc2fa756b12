"""Recipe loading: YAML files, ``base:`` inheritance, dotted ``key=value`` overrides, validation.

A recipe is a YAML file under ``contrastlab/config/recipes/<dataset>/<name>.yaml`` (addressed as
``<dataset>/<name>``) or any YAML file given by path. A recipe may start with ``base: <recipe>`` to
inherit another and change a few keys. Every key is checked against :class:`~contrastlab.config.schema.Config`;
an unknown key fails with a :class:`~contrastlab.errors.ConfigError` naming it and the nearest valid keys.

Example:
    >>> cfg = load_config("demo", ["optim.lr=0.1", "seed=3"])
    >>> cfg.seed
    3
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""PyYAML's safe loader, in C where PyYAML was built with libyaml (about 10 times faster on recipes)."""

from contrastlab.config.schema import Config, ViewsConfig
from contrastlab.config.validate import check_names, validate
from contrastlab.errors import ConfigError
from contrastlab.registry import METHODS, PLANNERS, import_plugin, resolve_plugin

RECIPE_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    """All shipped recipe names, ``<dataset>/<name>`` (or ``<name>`` at the top level), sorted.

    Files under folders starting with ``_`` (shared bases) are not listed but can be inherited.
    """
    names = (p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in RECIPE_DIR.rglob("*.yaml"))
    return sorted(n for n in names if not n.startswith("_"))


LINEAR_PREFIX = "linear/"


def is_linear_recipe(recipe: str) -> bool:
    """Linear-probe recipes (``linear/<name>``) hold only a ``linear:`` section, for ``eval linear --recipe``."""
    return recipe.startswith(LINEAR_PREFIX)


def linear_section(recipe: str) -> dict[str, Any]:
    """The ``linear:`` mapping of a linear-probe recipe."""
    if not is_linear_recipe(recipe):
        raise ConfigError(f"{recipe!r} is not a linear-probe recipe; those are named {LINEAR_PREFIX}<name> "
                          "(see `contrastlab recipes`)")
    section = read_recipe(recipe).get("linear")
    if not isinstance(section, dict):
        raise ConfigError(f"linear-probe recipe {recipe!r} has no 'linear:' mapping")
    return section


FINETUNE_PREFIX = "finetune/"


def is_finetune_recipe(recipe: str) -> bool:
    """Fine-tuning recipes (``finetune/<name>``) hold only a ``finetune:`` section, for ``eval finetune --recipe``."""
    return recipe.startswith(FINETUNE_PREFIX)


def finetune_section(recipe: str) -> dict[str, Any]:
    """The ``finetune:`` mapping of a fine-tuning recipe."""
    if not is_finetune_recipe(recipe):
        raise ConfigError(f"{recipe!r} is not a fine-tuning recipe; those are named {FINETUNE_PREFIX}<name> "
                          "(see `contrastlab recipes`)")
    section = read_recipe(recipe).get("finetune")
    if not isinstance(section, dict):
        raise ConfigError(f"fine-tuning recipe {recipe!r} has no 'finetune:' mapping")
    return section


def recipe_path(recipe: str) -> Path:
    """The YAML file of a recipe name or path; ConfigError naming the nearest recipes if absent."""
    as_path = Path(recipe)
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise ConfigError(f"recipe file {as_path} does not exist")
        return as_path
    path = RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(recipe, recipe_names(), n=4, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown recipe {recipe!r}.{hint} `contrastlab recipes` lists them all; a path to a .yaml file also works."
        )
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping of sections, found {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``update`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe(recipe: str, _seen: tuple[str, ...] = (), notes: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a recipe with its ``base:`` chain merged in (``notes``: see :func:`merge_switching`)."""
    if recipe in _seen:
        raise ConfigError(f"recipe inheritance loops: {' -> '.join(_seen + (recipe,))}")
    path = recipe_path(recipe)
    data = _read_yaml(path)
    if isinstance(data.get("plugins"), list):  # a recipe's plug-in files are found beside the recipe
        data["plugins"] = [resolve_plugin(spec, path.parent) for spec in data["plugins"]]
    base = data.pop("base", None)
    if base is None:
        return data
    return merge_switching(read_recipe(str(base), _seen + (recipe,), notes), data, notes, f"recipe {recipe}")


def _switchable() -> dict[str, tuple[str, set[str], Any, Any]]:
    """Sections whose keys depend on a name in them: section -> (name key, keys every entry reads, the entry's own
    keys, its registry). A method's keys are all its own: another method inherits none of them."""
    views_common = {f.name for f in dataclasses.fields(ViewsConfig)} - {"params"}
    return {"views": ("planner", views_common, planner_keys, PLANNERS),
            "method": ("name", {"name"}, lambda name: (), METHODS)}


def merge_switching(base: dict[str, Any], update: dict[str, Any], notes: list[str] | None = None,
                    what: str = "the overrides") -> dict[str, Any]:
    """``deep_merge(base, update)``, except that when ``update`` switches the method (``method.name``) or the planner
    (``views.planner``), what ``base`` set for the old one is not inherited where it would replace the new one's
    own defaults: a switched method starts from its constructor's defaults (the old method's head sizes are not
    the new one's), a switched planner from its ``Settings`` defaults for the keys it does not share with the old
    one. Each switch is described in ``notes`` (the keys dropped and kept), which the trainer logs."""
    base = copy.deepcopy(base)
    import_plugins(update.get("plugins", base.get("plugins")))  # their planners and methods may be switched to
    for section, (name_key, common, keys_of, registry) in _switchable().items():
        new = update.get(section, {}).get(name_key) if isinstance(update.get(section), dict) else None
        old_section = base.get(section)
        if new is None or not isinstance(old_section, dict) or old_section.get(name_key, new) == new:
            continue
        if new not in registry:
            continue  # the unknown name fails later, naming the nearest ones
        keep = common | set(keys_of(new))
        base[section] = {k: v for k, v in old_section.items() if k in keep}
        if notes is not None:
            given = set(update[section])
            dropped = sorted(k for k in old_section if k not in keep and k not in given)
            kept = sorted(k for k in base[section] if k != name_key and k not in given and k not in common)
            described = [f"dropped the inherited {', '.join(dropped)}" if dropped else "",
                         f"kept the inherited {', '.join(kept)}" if kept else ""]
            detail = "; ".join(d for d in described if d)
            if detail:
                notes.append(f"{what} switch {section}.{name_key} from {old_section[name_key]!r} to {new!r}: {detail} "
                             f"(the new {'planner' if section == 'views' else 'method'}'s own defaults apply; --show prints "
                             "them)")
    return deep_merge(base, update)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.5"`` -> ``("optim.lr", 0.5)``; values are parsed as YAML scalars or lists. ``key+=[a, b]``
    gives ``("key+", [a, b])``: append to the list ``key`` (:func:`load_config`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.5 (or key+=[a] to append "
                          "to a list such as observers)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.load(raw, Loader=YAML_LOADER) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for key ``"a.b"``, creating mappings on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config mapping as ``{"optim.lr": "0.5", ...}``."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def changed_keys(saved: str | None, cfg: Config, sections: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(key, saved value, value now)`` for each key starting with one of ``sections`` whose value in ``cfg``
    differs from the saved config ``saved`` (YAML text of :func:`dump_config`, as checkpoints hold it); a key one
    side lacks shows as ``(not set)``. Nothing when ``saved`` is missing or not a mapping."""
    try:
        tree = yaml.safe_load(saved) if saved else None
    except yaml.YAMLError:
        return []
    if not isinstance(tree, dict):
        return []
    saved_method = tree.get("method") if isinstance(tree.get("method"), dict) else {}
    if saved_method.get("name", cfg.method.name) in METHODS:  # configs saved before defaults were written out
        tree = {**tree, "method": {**_method_defaults(saved_method.get("name", cfg.method.name)), **saved_method}}
    before, now = flat_params(tree), flat_params(config_to_dict(cfg, method_defaults=True))
    keys = sorted(k for k in set(before) | set(now) if k.startswith(sections) and before.get(k) != now.get(k))
    return [(k, before.get(k, "(not set)"), now.get(k, "(not set)")) for k in keys]


def valid_keys(method_name: str | None = None, planner_name: str | None = None) -> list[str]:
    """Every dotted key a recipe or override may set (the keys of ``method_name`` and ``planner_name`` included)."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            ftype = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(ftype):
                walk(ftype, f"{prefix}{f.name}.")
            elif not (cls.__name__ in ("MethodConfig", "ViewsConfig") and f.name == "params"):
                keys.append(f"{prefix}{f.name}")

    walk(Config, "")
    if method_name is not None:
        keys.extend(f"method.{name}" for name in method_parameters(method_name))
    if planner_name is not None:
        keys.extend(f"views.{name}" for name in planner_keys(planner_name))
    return keys


def planner_keys(planner_name: str) -> list[str]:
    """The ``views.*`` keys that planner ``planner_name`` declares in its ``Settings``."""
    return [f.name for f in dataclasses.fields(PLANNERS[planner_name].Settings)]


def method_parameters(method_name: str) -> dict[str, inspect.Parameter]:
    """Keyword arguments the method's constructor accepts (besides the backbone)."""
    from contrastlab.methods import method_kwargs

    METHODS.check(method_name)
    return method_kwargs(method_name)


MOVED = {
    "monitor.score_stats": "score statistics are an observer now: add score_statistics to the list `observers`",
    "monitor.plots": "training-curve plots are an observer now: list `observers` without plots to turn them off",
}
"""Keys that no longer exist -> where their setting went."""


def _unknown_key(key: str, candidates: list[str], note: str = "") -> ConfigError:
    if key in MOVED:
        return ConfigError(f"config key {key!r} was removed: {MOVED[key]} (`contrastlab train RECIPE --show` prints "
                           "every key)")
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not close:
        leaf = key.split(".")[-1]
        close = [c for c in candidates if c.split(".")[-1] == leaf][:3]
    hint = f" Nearest valid keys: {', '.join(close)}." if close else ""
    return ConfigError(f"unknown config key {key!r}{note}.{hint} `contrastlab train RECIPE --show` prints every "
                       "key.")


def _is_instance(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against a simple type annotation, converting int -> float where declared."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _is_instance(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp) and isinstance(value, str), value
    if tp is Any:
        return True, value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, value
        (inner,) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, conv = _is_instance(item, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _build_section(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + key, valid_keys())
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            kwargs[key] = _build_section(ftype, value, f"{prefix}{key}.")
            continue
        ok, conv = _is_instance(value, ftype)
        if not ok and typing.get_origin(ftype) is typing.Literal:
            choices = [str(c) for c in typing.get_args(ftype)]
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key {prefix}{key} must be one of {', '.join(choices)}, got {value!r}{hint}")
        if not ok:
            tname = getattr(ftype, "__name__", str(ftype)).replace("typing.", "")
            raise ConfigError(f"config key {prefix}{key} expects {tname}, got {value!r}")
        kwargs[key] = conv
    return cls(**kwargs)


def _build_views(data: Any) -> ViewsConfig:
    """The ``views`` section: its own keys, and the chosen planner's keys typed and completed by its ``Settings``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section views must be a mapping, got {data!r}")
    planner = data.get("planner", ViewsConfig().planner)
    PLANNERS.check(planner, "views.planner")
    common = {f.name for f in dataclasses.fields(ViewsConfig)} - {"params"}
    settings_cls = PLANNERS[planner].Settings
    own = set(planner_keys(planner))
    for key in data:
        if key not in common and key not in own:
            raise _unknown_key(f"views.{key}", valid_keys(None, planner), f" (planner {planner!r} reads "
                               f"{', '.join(sorted(own)) or 'no keys of its own'})")
    views = _build_section(ViewsConfig, {k: v for k, v in data.items() if k in common}, "views.")
    settings = _build_section(settings_cls, {k: v for k, v in data.items() if k in own}, "views.")
    views.params = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return views


def planner_settings(views: ViewsConfig) -> Any:
    """The chosen planner's ``Settings`` instance from ``views.params``."""
    return _build_section(PLANNERS[views.planner].Settings, dict(views.params), "views.")


LEGACY_VIEWS_KEYS = ("num_views", "scale", "ratio", "num_small", "small_size", "small_scale", "padding", "joint_beta",
                     "joint_epsilon", "joint_fallback", "ccrop_alpha", "box_warmup_epochs", "box_update_every",
                     "box_threshold", "heatmap", "semantic_suppression", "semantic_push_apart")
"""The planner keys that version-1 configs (checkpoints before planners owned their keys) held for every planner."""


def upgrade_saved_config(tree: dict[str, Any], version: int) -> dict[str, Any]:
    """A config saved by an older contrastlab, made loadable: version 1 wrote every planner's ``views`` keys whatever
    the planner; the keys the chosen planner does not read were ignored then and are dropped now."""
    if version >= 2 or not isinstance(tree.get("views"), dict):
        return tree
    views = dict(tree["views"])
    planner = views.get("planner", ViewsConfig().planner)
    if planner in PLANNERS:
        keep = set(planner_keys(planner))
        views = {k: v for k, v in views.items() if k not in LEGACY_VIEWS_KEYS or k in keep}
    return {**tree, "views": views}


def _build_method(data: Any) -> dict[str, Any]:
    from contrastlab.config.schema import MethodConfig

    if not isinstance(data, dict):
        raise ConfigError(f"config section method must be a mapping, got {data!r}")
    data = dict(data)
    name = data.pop("name", MethodConfig().name)
    params = method_parameters(name)
    for key in data:
        if key not in params:
            others = [m for m in METHODS.names() if m != name and key in method_parameters(m)]
            if others:  # a plug-in such as feature_transform, which only some methods can take
                raise ConfigError(f"method {name!r} takes no key method.{key}: it is a key of {', '.join(others)} "
                                  f"(what it configures needs something method {name!r} does not have, e.g. "
                                  f"InfoNCE logits for feature_transform). Remove method.{key}, or choose one of "
                                  "those methods")
            raise _unknown_key(f"method.{key}", valid_keys(name))
    return {"name": name, "params": data}


def import_plugins(plugins: Any) -> list[str] | None:
    """Import the ``plugins`` of a config (modules or ``.py`` files that register their entries); returns them as
    recorded (``.py`` paths absolute: a run directory's config then works from any folder)."""
    if plugins is None:
        return None
    if not isinstance(plugins, list):
        raise ConfigError(f"config key plugins expects a list of module names or .py paths, got {plugins!r}")
    resolved = [resolve_plugin(spec) for spec in plugins]
    for spec in resolved:
        import_plugin(spec)
    return resolved


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Validate a nested mapping and build the :class:`Config` (ConfigError on any bad key, type or name).

    The ``plugins`` are imported first, so the names they register (methods, crop laws, datasets, ...) are
    known when every name of the config is checked against its registry.
    """
    tree = copy.deepcopy(tree)
    plugins = import_plugins(tree.get("plugins"))
    if plugins is not None:
        tree["plugins"] = plugins
    method = _build_method(tree.pop("method", {}))
    views = _build_views(tree.pop("views", {}))
    cfg = _build_section(Config, tree, "")
    cfg.method.name = method["name"]
    cfg.method.params = method["params"]
    cfg.views = views
    validate(cfg)
    check_names(cfg)
    return cfg


def config_to_dict(cfg: Config, method_defaults: bool = False) -> dict[str, Any]:
    """The nested mapping of a config, method and planner params flattened into their sections (round-trips).

    ``method_defaults``: the method section also holds the constructor defaults of the keys nobody set (what runs).
    """
    tree = dataclasses.asdict(cfg)
    method = tree.pop("method")
    defaults = _method_defaults(method["name"]) if method_defaults else {}
    tree["method"] = {"name": method["name"], **defaults, **method["params"]}
    views = tree.pop("views")
    params = views.pop("params")
    tree["views"] = {**views, **params}
    order = list(dataclasses.asdict(Config()))  # keep the sections in the schema's order
    return {key: tree[key] for key in order}


def load_config(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe, apply ``key=value`` overrides (``key+=[a, b]`` appends to a list: ``observers+=[my_probe]``
    keeps the recipe's observers and adds one), validate, and return the :class:`Config`.

    The returned config's ``notes`` list what the loading decided that a user may not expect (a switched method or
    planner and the inherited keys it dropped or kept); the trainer logs them and ``--show`` prints them.
    """
    notes: list[str] = []
    tree = read_recipe(recipe, notes=notes)
    given: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key.endswith("+"):
            key = key[:-1].strip()
            current = _dotted(given, key, _dotted(tree, key, _dotted(config_to_dict(Config()), key, None)))
            if not isinstance(current, list) or not isinstance(value, list):
                raise ConfigError(f"override {text!r}: += appends a list to a list key (observers+=[name], "
                                  f"log.to+=[tensorboard], plugins+=[file.py]); {key} is {current!r}")
            value = current + value
        set_dotted(given, key, value)
    cfg = config_from_dict(merge_switching(tree, given, notes))
    cfg.notes = tuple(notes)
    return cfg


def _dotted(tree: dict[str, Any], key: str, default: Any) -> Any:
    """``tree["a"]["b"]`` for key ``"a.b"``, or ``default``."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def dump_config(cfg: Config) -> str:
    """YAML text of the complete config that runs (the method's constructor defaults included), loadable again with
    :func:`load_config` as a path."""
    return yaml.safe_dump(config_to_dict(cfg, method_defaults=True), sort_keys=False)


def _method_defaults(name: str) -> dict[str, Any]:
    from contrastlab.methods import method_defaults

    return method_defaults(name)
