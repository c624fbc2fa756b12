"""The observer interface: callbacks the trainer calls at fixed points of a run, and the view of the run they get.

Everything that watches training without being part of the optimisation is an :class:`Observer`: the kNN and
test-accuracy monitors, score statistics, ContrastiveCrop's localiser, loggers (``metrics.jsonl``, TensorBoard,
wandb, MLflow), training-curve plots and the console progress line. The trainer knows none of them by name; it
builds the ones a config lists in ``observers`` and ``log.to`` from their registries
(:data:`~contrastlab.registry.OBSERVERS`, :data:`~contrastlab.registry.LOGGERS`), adds the instances given to it
in Python, and calls the list. The hook set follows PyTorch Lightning's ``Callback`` (start, epoch start and end,
batch end, state for checkpoints, end).

Call order within a run (``run.epoch`` counts finished epochs; ``run.step`` optimiser steps)::

    on_start(run)                            after set-up and any resume, before the warm start
    for each epoch:
        on_epoch_start(run)
        on_step_end(run, step_output)        after each optimiser step (skipped steps and warm-start steps: none)
        on_log(run, metrics, step)           every ``train.log_every`` steps: {"train/loss", "train/lr"}
        on_epoch_end(run, record)            record: the epoch's metrics dict, which observers may add to
    on_finish(run, results)                  results: the dict written to results.json, which observers may add to

Observers are called in list order: those of ``observers`` first, then given instances, then loggers, so a logger
sees every entry the monitors added to an epoch's record. ``state_dict`` is saved in every checkpoint and handed
back to ``load_state_dict`` when the run resumes. A registered factory ``(run) -> Observer | None`` is called once
per run on every rank, after the method is built and before a resume is loaded; it returns None where its
observer does not apply (another rank than 0 for a monitor, a method without classifiers, a crop law without
boxes). An :class:`Observer` subclass may be registered instead of a factory: it is instantiated the same way,
with the run if its constructor takes one argument.

Example:
    A third-party observer that counts steps and reports the count in each epoch's record::

        import contrastlab

        @contrastlab.register_observer("step_counter")
        def step_counter(run):
            return StepCounter()

        class StepCounter(contrastlab.Observer):
            def __init__(self):
                self.steps = 0
            def on_step_end(self, run, step_output):
                self.steps += 1
            def on_epoch_end(self, run, record):
                record["steps_seen"] = self.steps
            def state_dict(self):
                return {"steps": self.steps}
            def load_state_dict(self, state):
                self.steps = state["steps"]

    and ``observers: [progress, knn, step_counter]`` in a recipe (with ``plugins: [my_module]``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contrastlab.errors import ConfigError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from contrastlab.config.derived import Derived
    from contrastlab.config.schema import Config
    from contrastlab.methods.base import Method, StepOutput
    from contrastlab.registry import Registry

__all__ = ["Observer", "ObserverList", "Run", "evaluation_batch_size"]


class Observer:
    """Base class of observers: every hook is a no-op, so a subclass implements only what it needs.

    Attributes:
        name: Set by the trainer to the name the observer was listed under (its registry name), or the class
            name for an instance given in Python; it keys the observer's state in checkpoints.
        rank_local_state: ``False`` (default): the state is the same on every rank; rank 0's is saved and every
            rank loads it. ``True``: each rank holds its own state, and only within an epoch (score statistics'
            rows of the current epoch); mid-epoch checkpoints keep every rank's, end-of-epoch ones none.
    """

    name: str = ""
    rank_local_state: bool = False

    def on_start(self, run: Run) -> None:
        """Training is about to start (or continue, after a resume: ``run.epoch`` and ``run.step`` say where)."""

    def on_epoch_start(self, run: Run) -> None:
        """Epoch ``run.epoch + 1`` is about to start."""

    def on_step_end(self, run: Run, step_output: StepOutput) -> None:
        """After optimiser step ``run.step`` (1-based), with the method's :class:`~contrastlab.methods.base.StepOutput`.

        Called on every rank with that rank's output; its tensors are on the device and detached (``loss`` too).
        Reading one to the host (``.item()``) makes the step wait for the device: accumulate on the device instead.
        """

    def on_log(self, run: Run, metrics: Mapping[str, float], step: int) -> None:
        """Scalars published through :meth:`Run.log_metrics` (the trainer's ``train/loss`` and ``train/lr``)."""

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        """Epoch ``run.epoch`` (1-based) ended; add entries to ``record`` (the line of ``metrics.jsonl``).

        ``record`` holds ``epoch``, ``step``, ``loss`` (mean over the epoch and the ranks), ``lr``, ``img_per_s``,
        ``parts`` (the method's loss terms) and what earlier observers added. Called on every rank (where the
        observer exists); to stop the run, call :meth:`Run.request_stop`.
        """

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        """Training ended; add final numbers to ``results`` (written to ``results.json`` by rank 0)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (saved in checkpoints); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def evaluation_batch_size(run: Run) -> int:
    """Batch size of the evaluation passes over a dataset (monitors, localiser): at least 64 images."""
    return max(64, run.derived.per_rank_batch_size)


class Run:
    """What observers see of a training run: read-only properties, plus three requests (log, metrics, stop).

    Built by :class:`~contrastlab.engine.trainer.Trainer`; an observer needs nothing private of the trainer.

    Attributes:
        shared: A dict observers may use to share resources built once per run (the monitors' test loader).
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer
        self._test_dataset: Dataset | None = None
        self._stop: BaseException | None = None
        self.shared: dict[str, Any] = {}

    # --- what the run is ----------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The run's validated config."""
        return self._trainer.cfg

    @property
    def recipe(self) -> str:
        """The recipe name the run was started from (``"run"`` when built in Python)."""
        return self._trainer.recipe

    @property
    def method(self) -> Method:
        """The method being trained (not wrapped by DDP or ``torch.compile``); ``method.backbone`` its backbone."""
        return self._trainer.method

    @property
    def device(self) -> Any:
        """The ``torch.device`` this rank trains on."""
        return self._trainer.device

    @property
    def rank(self) -> int:
        """This process's rank (0 in a single process)."""
        return self._trainer.rank

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self._trainer.world

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the rank that writes files and logs)."""
        return self._trainer.rank == 0

    @property
    def quiet(self) -> bool:
        """Whether console output was turned off (``train(..., quiet=True)``)."""
        return self._trainer.quiet

    @property
    def out(self) -> Path:
        """The run directory."""
        return self._trainer.out

    @property
    def derived(self) -> Derived:
        """Values derived from the config and the world size: batch sizes, scaled lr, steps per epoch, total steps."""
        return self._trainer.d

    # --- where it stands ----------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Finished epochs: the 0-based index of the current epoch while it runs, its 1-based number at its end."""
        return self._trainer.epoch

    @property
    def step(self) -> int:
        """Optimiser steps done (warm-start steps not counted)."""
        return self._trainer.step

    @property
    def total_steps(self) -> int:
        """Steps of the whole run (``train.max_steps`` applied)."""
        return self._trainer.d.total_steps

    @property
    def last_epoch(self) -> bool:
        """In :meth:`Observer.on_epoch_end`: whether this is the run's final epoch."""
        return self._trainer.step >= self._trainer.d.total_steps

    @property
    def lr(self) -> float:
        """The learning rate of the latest step (of the first parameter group)."""
        return self._trainer.optimizer.param_groups[0]["lr"]

    # --- what it trains on --------------------------------------------------------------------------------
    @property
    def train_dataset(self) -> Dataset:
        """The raw training dataset (``(PIL image, label, index)`` items)."""
        return self._trainer.base_train

    @property
    def train_views(self) -> Any:
        """The training :class:`~contrastlab.views.ViewDataset` (its ``planner`` plans the crops)."""
        return self._trainer.train_set

    @property
    def device_views(self) -> Any:
        """The device pipeline feeding the steps (``data.pipeline=gpu``), or ``None`` for CPU DataLoader workers."""
        return self._trainer.device_views

    @property
    def input_pipeline(self) -> str:
        """What feeds the steps: ``gpu-resident``, ``gpu-files`` or ``cpu-workers``."""
        return self._trainer.input_pipeline

    @property
    def num_classes(self) -> int:
        """Classes of the training dataset (1 when it has none)."""
        return self._trainer.num_classes

    @property
    def test_dataset(self) -> Dataset:
        """The raw test dataset (given to the trainer, else ``data.test_split``), loaded on first use."""
        if self._test_dataset is None:
            self._test_dataset = self._trainer.load_test_dataset()
        return self._test_dataset

    # --- requests -----------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Print a console line (rank 0, unless quiet)."""
        self._trainer.log(message)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Send scalars to every observer's :meth:`Observer.on_log` (loggers record them) at ``step`` (default: now)."""
        self._trainer.observers.on_log(self, metrics, self.step if step is None else step)

    def request_stop(self, error: BaseException) -> None:
        """Stop the run after this epoch's end: its record is logged and its checkpoint written, then ``error`` is
        raised (on every rank: the others raise the first requesting rank's error)."""
        if self._stop is None:
            self._stop = error

    @property
    def stop_requested(self) -> BaseException | None:
        """The error passed to :meth:`request_stop` on this rank, if any."""
        return self._stop


def _make_observer(entry: Any, run: Run) -> Observer | None:
    """``entry(run)``, or ``entry()`` for an Observer class whose constructor takes no argument."""
    if isinstance(entry, type) and issubclass(entry, Observer):
        try:
            inspect.signature(entry).bind(run)
        except TypeError:
            return entry()
    return entry(run)


class ObserverList:
    """The observers of one run, called in order; their states keyed by name for checkpoints.

    Args:
        named: ``(name, observer)`` pairs; names must be unique.
    """

    def __init__(self, named: Iterable[tuple[str, Observer]]) -> None:
        self.observers: list[Observer] = []
        for name, observer in named:
            if not isinstance(observer, Observer):
                raise ConfigError(f"observer {name!r} is a {type(observer).__name__}; an observer must be an "
                                  "instance of contrastlab.Observer (or a subclass)")
            if any(o.name == name for o in self.observers):
                raise ConfigError(f"two observers are named {name!r}; list each once, or give the instances "
                                  "distinct `name` attributes")
            observer.name = name
            self.observers.append(observer)

    @staticmethod
    def build(run: Run, names: Iterable[str], registry: Registry) -> list[tuple[str, Observer]]:
        """Build the observer of each name, keeping what is not None: a registered factory ``(run) -> Observer |
        None`` is called with the run; a registered :class:`Observer` subclass is instantiated, with the run when
        its constructor takes an argument, else with none.

        An entry registered with ``required_when=f`` (``f(run) -> reason | None``) must be listed whenever ``f``
        gives a reason (the localiser, when the crop law keeps boxes that only it refreshes): a ConfigError.
        """
        names = list(names)
        for name in registry.names():
            required_when = registry.info(name).get("required_when")
            reason = required_when(run) if required_when is not None and name not in names else None
            if reason:
                raise ConfigError(f"{reason}; add {name!r} to the config list `{registry.key}` "
                                  f"(it lists {', '.join(names) or 'nothing'})")
        built = []
        for name in names:
            observer = _make_observer(registry[name], run)
            if observer is not None:
                built.append((name, observer))
        return built

    def __iter__(self) -> Iterator[Observer]:
        return iter(self.observers)

    def __len__(self) -> int:
        return len(self.observers)

    def names(self) -> list[str]:
        """The observers' names, in call order."""
        return [o.name for o in self.observers]

    def __getitem__(self, name: str) -> Observer:
        """The observer named ``name`` (KeyError naming the ones this run has)."""
        for o in self.observers:
            if o.name == name:
                return o
        raise KeyError(f"no observer named {name!r} in this run; it has {', '.join(self.names()) or 'none'}")

    def on_start(self, run: Run) -> None:
        for o in self.observers:
            o.on_start(run)

    def on_epoch_start(self, run: Run) -> None:
        for o in self.observers:
            o.on_epoch_start(run)

    def on_step_end(self, run: Run, step_output: StepOutput) -> None:
        for o in self.observers:
            o.on_step_end(run, step_output)

    def on_log(self, run: Run, metrics: Mapping[str, float], step: int) -> None:
        for o in self.observers:
            o.on_log(run, metrics, step)

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        for o in self.observers:
            o.on_epoch_end(run, record)

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        for o in self.observers:
            o.on_finish(run, results)

    def state_dict(self, rank_local: bool) -> dict[str, Any]:
        """``{name: state}`` of the observers whose ``rank_local_state`` is ``rank_local``."""
        return {o.name: o.state_dict() for o in self.observers if o.rank_local_state == rank_local}

    def load_state_dict(self, states: Mapping[str, Any], rank_local: bool, log: Callable[[str], None]) -> None:
        """Hand each observer its state; a state whose observer this run (or rank) lacks is reported, not loaded."""
        mine = {o.name: o for o in self.observers if o.rank_local_state == rank_local}
        for name, state in states.items():
            if name in mine:
                mine[name].load_state_dict(state)
            elif not any(o.name == name for o in self.observers):
                close = difflib.get_close_matches(name, list(mine), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                log(f"the checkpoint holds the state of observer {name!r}, which this run does not have{hint}; "
                    "its state is not restored")
