"""Registries: every named thing a config can choose (a method, a crop law, a dataset, a backbone, ...) is looked up here.

One mechanism serves every concept. A registry maps a name to an object (a class or a factory) plus optional
information about it (a dataset's normalisation and native size). Entries are added with a decorator, by the
package for its built-ins and by users for their own, from outside the package::

    import contrastlab

    @contrastlab.register_method("my_moco")
    class MyMoCo(contrastlab.Method):
        ...

A lookup of an unknown name fails with a :class:`~contrastlab.errors.ConfigError` naming the config key, the
nearest registered names and every valid one (timm's model registry has the same shape). Built-in entries are
imported on the first lookup, and so are the plug-ins of installed packages that declare an entry point in the
group ``contrastlab.plugins`` (importing such a module registers its entries).

Example:
    >>> from contrastlab.registry import Registry
    >>> colours = Registry("colour", "paint.colour")
    >>> @colours.register("red")
    ... def red():
    ...     return (255, 0, 0)
    >>> colours["red"]()
    (255, 0, 0)
    >>> colours.names()
    ['red']
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from contrastlab.errors import ConfigError

T = TypeVar("T")

PLUGIN_GROUP = "contrastlab.plugins"
"""Entry-point group of installed plug-in packages: each entry names a module that registers its entries."""

_plugins_loaded = False


def _load_entry_point_plugins() -> None:
    """Import the modules of every ``contrastlab.plugins`` entry point, once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plug-in package must say which one it is
            raise ConfigError(f"plug-in entry point {entry.name!r} ({entry.value}) of group {PLUGIN_GROUP} failed "
                              f"to import: {type(exc).__name__}: {exc}. Fix or uninstall that package.") from exc


def resolve_plugin(spec: str, relative_to: str | Path | None = None) -> str:
    """A ``plugins`` entry as it is recorded: a ``.py`` path made absolute (against ``relative_to``, the folder of
    the recipe file that names it, else the current directory), a module name as it is.

    Raises:
        ConfigError: the entry is neither a module name nor a ``.py`` path.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"plugins: each entry must be a module name or a .py file path, got {spec!r}")
    if not spec.endswith(".py"):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = Path(relative_to) / path
    return str(path.resolve())


def _imported_from(path: Path) -> Any:
    """The module already imported from the file ``path`` (under any name), if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.endswith(path.name) and Path(file).resolve() == path:
            return module
    return None


def import_plugin(spec: str) -> None:
    """Import a plug-in so that it registers its entries: a module name (``my_lab.crops``) or a ``.py`` file path.

    A file is imported as a module named after its stem, with its folder on ``sys.path`` (as a script's is, so it
    can import the helper modules beside it). A file already imported, under any module name (``import barlow`` in
    a notebook, then ``plugins=[barlow.py]``), is not run again.

    Raises:
        ConfigError: the module or file cannot be found or fails to import.
    """
    spec = resolve_plugin(spec)
    try:
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise ConfigError(f"plugins: file {path} does not exist; give a .py file or an importable module name "
                                  "(a relative path is read against the current folder, or in a recipe file against "
                                  "the recipe's folder)")
            if _imported_from(path) is not None:
                return
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            name = f"contrastlab_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            importlib.import_module(spec)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(f"plugins: cannot import {spec!r} ({exc}); install it, add its folder to PYTHONPATH, "
                          "or give the path of its .py file") from exc
    except Exception as exc:  # the plug-in's own error, named
        raise ConfigError(f"plugins: importing {spec!r} failed: {type(exc).__name__}: {exc}") from exc


def _own_name(target: Any) -> Any:
    """The ``name`` a class defines itself (not one it inherits), or a function's ``name`` attribute."""
    if isinstance(target, type):
        return vars(target).get("name")
    return getattr(target, "name", None)


def _described(target: Any) -> str:
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(target)


def _source_file(target: Any) -> str | None:
    try:
        return str(Path(inspect.getsourcefile(target) or "").resolve())
    except (TypeError, OSError):
        return None


def _same_definition(old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` defined again: the same file run twice (imported in Python and listed in
    ``plugins``), or a notebook cell run again (both defined interactively, in ``__main__``)."""
    if getattr(old, "__qualname__", None) != getattr(new, "__qualname__", None) or type(old) is not type(new):
        return False
    if getattr(old, "__module__", None) == getattr(new, "__module__", None) == "__main__":
        return True
    source = _source_file(old)
    return source is not None and source == _source_file(new)


class Registry(Generic[T]):
    """Names of one concept -> objects, with information per entry and helpful errors.

    Args:
        kind: What the entries are, for messages (``"method"``, ``"crop law"``).
        key: The config key that names an entry (``"method.name"``), for messages.
        builtins: Modules that register the built-in entries; imported on the first lookup.
        register_with: The public function that adds entries (``"contrastlab.register_method"``), for messages.
    """

    def __init__(self, kind: str, key: str | None = None, builtins: tuple[str, ...] = (),
                 register_with: str | None = None) -> None:
        self.kind, self.key, self.builtins, self.register_with = kind, key, builtins, register_with
        self._entries: dict[str, T] = {}
        self._info: dict[str, Mapping[str, Any]] = {}
        self._ready = not builtins

    def _ensure(self) -> None:
        if not self._ready:
            self._ready = True
            for module in self.builtins:
                importlib.import_module(module)
            _load_entry_point_plugins()

    def register(self, name: str | None = None, obj: T | None = None, *, replace: bool = False,
                 **info: Any) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it decorates.

        Args:
            name: The config name; defaults to the object's ``name`` attribute.
            obj: The object (a class or a factory).
            replace: Allow replacing an existing entry (otherwise a second registration of a name is an error,
                so two plug-ins cannot silently shadow each other).
            **info: Information stored beside the entry (:meth:`info`).

        Returns:
            ``obj`` (so the decorator leaves the class or function unchanged), or the decorator.
        """
        def add(target: T) -> T:
            entry_name = name if name is not None else _own_name(target)
            if not isinstance(entry_name, str) or not entry_name:
                raise ConfigError(f"register a {self.kind} with a name: {_described(target)} has no `name` of its own "
                                  f"(an inherited one would register it under its base class's name); pass the name, "
                                  f"e.g. {self.register_with or 'register'}(\"my_name\"), or set `name = ...` in it")
            previous = self._entries.get(entry_name)
            if previous is not None and not replace and previous is not target and not _same_definition(previous, target):
                raise ConfigError(f"a {self.kind} named {entry_name!r} is registered already "
                                  f"({_described(previous)}); choose another name or pass replace=True")
            self._entries[entry_name] = target
            self._info[entry_name] = MappingProxyType(dict(info))
            return target

        if obj is not None:
            return add(obj)
        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests and notebooks that register temporary entries)."""
        self._entries.pop(name, None)
        self._info.pop(name, None)

    def error(self, name: object, key: str | None = None) -> ConfigError:
        """The error for an unknown ``name``: the key, the nearest names, every valid one."""
        self._ensure()
        key = key or self.key
        valid = sorted(self._entries)
        close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        what = f"unknown {key} {name!r}: no {self.kind} has that name." if key else f"unknown {self.kind} {name!r}."
        how = f" Add your own with {self.register_with} (docs/extending.md)." if self.register_with else ""
        return ConfigError(f"{what}{hint} Valid: {', '.join(valid)}.{how}")

    def check(self, name: object, key: str | None = None) -> None:
        """Raise :meth:`error` unless ``name`` is registered."""
        if not self.__contains__(name):
            raise self.error(name, key)

    def __getitem__(self, name: str) -> T:
        self._ensure()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(name) from None

    get = __getitem__

    def info(self, name: str) -> Mapping[str, Any]:
        """The information registered with ``name`` (read-only)."""
        self[name]
        return self._info[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern`` (``"resnet*"``), sorted."""
        self._ensure()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def items(self) -> list[tuple[str, T]]:
        self._ensure()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


METHODS: Registry = Registry("method", "method.name", ("contrastlab.methods",), "contrastlab.register_method")
"""Method classes (:class:`~contrastlab.methods.base.Method` subclasses)."""

PLANNERS: Registry = Registry("planner", "views.planner", ("contrastlab.views.planners",), "contrastlab.register_planner")
"""Crop laws (:class:`~contrastlab.views.planners.base.Planner` subclasses): where each view's box lies."""

DATASETS: Registry = Registry("dataset", "data.name", ("contrastlab.data",), "contrastlab.register_dataset")
"""Dataset factories ``(root, split, **options) -> dataset``; info: ``normalization``, ``native_size``."""

BACKBONES: Registry = Registry("backbone", "model.arch", ("contrastlab.models.backbones",), "contrastlab.register_backbone")
"""Backbone builders ``(**options) -> (module, feature_dim)``; info: ``small_input``."""

PHOTOMETRICS: Registry = Registry("photometric recipe", "views.photometric", ("contrastlab.views.photometric",), "contrastlab.register_photometric")
"""Photometric recipes: ``view -> settings of PhotometricRecipe``."""

OBSERVERS: Registry = Registry("observer", "observers", ("contrastlab.observers",), "contrastlab.register_observer")
"""Observer factories ``(run) -> Observer | None`` (:mod:`contrastlab.observers`)."""

LOGGERS: Registry = Registry("logger", "log.to", ("contrastlab.observers.loggers",), "contrastlab.register_logger")
"""Logger factories ``(run) -> Logger`` (:mod:`contrastlab.observers.loggers`)."""

OPTIMIZERS: Registry = Registry("optimiser", "optim.name", ("contrastlab.engine.optim",), "contrastlab.register_optimizer")
"""Optimiser builders ``(param_groups, optim_config, lr) -> torch.optim.Optimizer``."""

LR_SCHEDULES: Registry = Registry("learning-rate schedule", "optim.schedule", ("contrastlab.engine.schedules",), "contrastlab.register_lr_schedule")
"""Learning-rate shapes after the warm-up: ``(progress in [0, 1], milestones passed, *, base, final, gamma) -> lr``."""

MOMENTUM_SCHEDULES: Registry = Registry("momentum schedule", "train.ema_schedule", ("contrastlab.engine.schedules",), "contrastlab.register_momentum_schedule")
"""EMA momentum shapes ``(progress in [0, 1], *, base) -> momentum``."""


IMPORTERS: Registry = Registry("importer", "--from", ("contrastlab.importers",), "contrastlab.register_importer")
"""Importers of released checkpoints (:class:`~contrastlab.importers.base.Importer` subclasses), ``contrastlab import
--from NAME``."""


def register_method(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register a :class:`~contrastlab.methods.base.Method` subclass under ``name`` (usable as a decorator)."""
    return METHODS.register(name, obj, **info)


def register_planner(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register a crop law (a :class:`~contrastlab.views.planners.base.Planner` subclass) as ``views.planner=name``."""
    return PLANNERS.register(name, obj, **info)


def register_dataset(name: str | None = None, obj: Any = None, *, normalization: tuple, native_size: int,
                     **info: Any) -> Any:
    """Register a dataset factory ``(root, split, **options)`` with its per-channel ``(mean, std)`` and image side.

    Example:
        >>> import contrastlab
        >>> @contrastlab.register_dataset("my_shapes", normalization=((0.5,) * 3, (0.25,) * 3), native_size=32)
        ... def my_shapes(root, split):
        ...     ...
    """
    if not (isinstance(normalization, (tuple, list)) and len(normalization) == 2
            and all(len(v) == 3 for v in normalization)):
        raise ConfigError(f"register_dataset({name!r}): normalization must be ((mean r, g, b), (std r, g, b)), got "
                          f"{normalization!r}")
    if isinstance(native_size, bool) or not isinstance(native_size, int) or native_size < 1:
        raise ConfigError(f"register_dataset({name!r}): native_size must be a positive int, got {native_size!r}")
    mean, std = (tuple(float(x) for x in v) for v in normalization)
    return DATASETS.register(name, obj, normalization=(mean, std), native_size=native_size, **info)


def register_backbone(name: str | None = None, obj: Any = None, *, small_input: bool = True, **info: Any) -> Any:
    """Register a backbone builder ``(**options) -> (nn.Module, feature_dim)``.

    Args:
        small_input: The network is built for small images (CIFAR-sized); False for networks that downsample
            early (ImageNet stems, ViT patches), which ``--smoke`` then feeds 32 px images instead of 16 px.
    """
    return BACKBONES.register(name, obj, small_input=small_input, **info)


def register_photometric(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register a photometric recipe ``view -> dict of PhotometricRecipe settings`` as ``views.photometric=name``."""
    return PHOTOMETRICS.register(name, obj, **info)


def register_observer(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register an observer factory ``(run) -> Observer | None`` for the config list ``observers``."""
    return OBSERVERS.register(name, obj, **info)


def register_logger(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register a logger factory ``(run) -> Logger`` for the config list ``log.to``."""
    return LOGGERS.register(name, obj, **info)


def register_lr_schedule(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register a learning-rate shape ``(progress, passed, *, base, final, gamma) -> lr`` as ``optim.schedule=name``."""
    return LR_SCHEDULES.register(name, obj, **info)


def register_momentum_schedule(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register an EMA momentum shape ``(progress, *, base) -> momentum`` as ``train.ema_schedule=name``."""
    return MOMENTUM_SCHEDULES.register(name, obj, **info)


def register_importer(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register an :class:`~contrastlab.importers.base.Importer` subclass as ``contrastlab import --from name``."""
    return IMPORTERS.register(name, obj, **info)


def register_optimizer(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register an optimiser builder ``(param_groups, optim_config, lr) -> Optimizer`` as ``optim.name=name``."""
    return OPTIMIZERS.register(name, obj, **info)
