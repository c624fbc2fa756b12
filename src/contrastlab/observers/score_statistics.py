"""Per-step statistics of positive and negative scores, before and after Feature Transformation.

The score-distribution tool of Zhu, Zhao, Liu, Sun, Chen, "Improving Contrastive Learning by Visualizing
Feature Transformation", ICCV 2021 (arXiv 2108.02982), section 3. Upstream (``memory/mem_moco.py``,
``_compute_logit``) keeps, for each anchor of each step, the positive score and the mean and variance of
its ``K`` negative scores (plus the mean of ``exp(neg / tau)`` and ``exp(pos / tau)``) instead of the
``K`` scores themselves; a notebook then plots their batch means against the iteration.

:class:`ScoreStatistics` records the same per-anchor statistics on every rank and every step, for the
scores the loss saw (``ft``, after FT) and for the scores before FT (``raw``), plus two hardness measures
upstream lacked: the largest negative score and the number of negatives scoring above the positive. It
also keeps one coarse histogram of positive and of negative scores per epoch.

**Scores, not logits.** The losses of this library put ``logit = score / tau`` in the step outputs
(``InfoNCELoss``, ``NTXentLoss``, CaCo). ``update`` takes ``tau`` and records ``score = logit * tau``: the
cosine similarity of unit features, or, after FT without re-normalisation, the dot product of the
transformed features (what upstream records too). The two exponential statistics are ``exp(score / tau)
= exp(logit)``; they are computed from a log-sum-exp in float64, so they do not overflow.

Per anchor ``a`` of a step, with positive score ``p`` and negative scores ``n_1..n_K``, the fields are:

====================  =================================================================================
``pos``               ``p``
``neg_mean``          ``mean_j n_j``
``neg_var``           ``var_j n_j`` (unbiased, ``K - 1`` in the denominator, as upstream's ``torch.var``)
``exp_neg_mean``      ``mean_j exp(n_j / tau)``
``exp_pos``           ``exp(p / tau)``
``neg_max``           ``max_j n_j`` (the hardest negative)
``n_above``           ``#{j : n_j > p}`` (negatives ranked above the positive)
====================  =================================================================================

**Cost.** Everything stays on the device: ``update`` launches a few reductions over the ``[A, K]``
logits and appends one ``[2, F, 2]`` tensor (the mean and the population variance over the anchors of
each field) without synchronising (no ``.item()``); the data cross to the host once per epoch, or every
``flush_every`` steps. ``timing=True`` measures the observer's own cost (host time, and device time with
CUDA events); :meth:`ScoreStatistics.overhead` reports it and each file stores it.

**Files.** :meth:`ScoreStatistics.end_epoch` writes ``<folder>/epoch_<EEEE>.rank<R>.npz`` (compressed;
about 0.2 kB per step without per-anchor arrays) holding:

- ``steps [S]`` (global step of each update), ``temperature [S]``, ``anchors [S]`` (``A``),
  ``negatives [S]`` (``K``), ``transformed [S]`` (the outputs had ``_raw`` twins, i.e. FT was configured);
- ``summary [S, 2, F, 2]`` float64: step, variant (``raw``, ``ft``), field, reduction over the anchors
  (``mean``, population ``var``); without FT both variants hold the same numbers;
- ``hist_edges [bins + 1]`` in score units and ``hist_pos``, ``hist_neg [2, bins + 2]`` counts per
  variant: column 0 counts scores below ``hist_range[0]``, the last column scores above ``hist_range[1]``;
- ``samples [S, 2, F, A]`` float32, per anchor, only with ``keep_samples=True`` (about ``56 A`` bytes per
  step before compression; rows of smaller batches are padded with NaN);
- ``variants``, ``fields``, ``reductions``, ``epoch``, ``rank``, ``format`` and the measured overhead.

:func:`read_score_file` reads one back. ``contrastlab.viz.score_plots`` merges ranks and epochs and draws
the published figures. In training, list ``score_statistics`` in the config's ``observers``
(:class:`ScoreStatisticsObserver`: every rank records every step into ``<run>/scores``).

Example:
    >>> stats = ScoreStatistics("runs/demo/scores", rank=0)  # doctest: +SKIP
    >>> for step, batch in enumerate(loader):  # doctest: +SKIP
    ...     out = method(*batch)
    ...     stats.update(out.outputs, temperature=0.2, step=step)
    >>> path = stats.end_epoch(1)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastlab.engine.distributed import get_rank
from contrastlab.errors import ConfigError
from contrastlab.observers.base import Observer, Run
from contrastlab.registry import register_observer

__all__ = [
    "FIELDS",
    "FORMAT",
    "REDUCTIONS",
    "VARIANTS",
    "ScoreStatistics",
    "ScoreStatisticsObserver",
    "anchor_statistics",
    "read_score_file",
    "score_file_name",
]

FORMAT = "contrastlab.score_statistics/1"
FIELDS = ("pos", "neg_mean", "neg_var", "exp_neg_mean", "exp_pos", "neg_max", "n_above")
VARIANTS = ("raw", "ft")  #: before Feature Transformation, and what the loss saw
REDUCTIONS = ("mean", "var")


def score_file_name(epoch: int, rank: int) -> str:
    """``epoch_0001.rank0.npz``: the file of one epoch on one rank."""
    return f"epoch_{epoch:04d}.rank{rank}.npz"


@torch.no_grad()
def anchor_statistics(pos_logits: torch.Tensor, neg_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The :data:`FIELDS` of every anchor, ``[F, A]`` float64, from logits ``[A]`` and ``[A, K]``.

    Args:
        pos_logits: ``score / tau`` of each anchor's positive.
        neg_logits: ``score / tau`` of its ``K`` negatives.
        temperature: ``tau``; scores are ``logit * tau``.
    """
    if pos_logits.dim() != 1 or neg_logits.dim() != 2 or neg_logits.shape[0] != pos_logits.shape[0]:
        raise ValueError(
            f"pos_logits must be [A] and neg_logits [A, K], got {tuple(pos_logits.shape)} "
            f"and {tuple(neg_logits.shape)}"
        )
    neg = neg_logits.float()
    pos = pos_logits.float()
    num_neg = neg.shape[1]
    if num_neg < 2:
        mean, var = neg.mean(dim=1), torch.full_like(pos, float("nan"))
    elif neg.is_cuda:  # one fused kernel
        var, mean = torch.var_mean(neg, dim=1, correction=1)
    else:  # two passes: several times faster than var_mean on CPUs
        mean = neg.mean(dim=1)
        var = (neg - mean[:, None]).square().sum(dim=1) / (num_neg - 1)
    log_mean_exp = torch.logsumexp(neg, dim=1).double() - math.log(num_neg)
    tau = float(temperature)
    return torch.stack(
        [
            pos.double() * tau,
            mean.double() * tau,
            var.double() * tau * tau,
            log_mean_exp.exp(),
            pos.double().exp(),
            neg.amax(dim=1).double() * tau,
            (neg > pos[:, None]).sum(dim=1).double(),
        ]
    )


_HISTC_CHUNK = 2**24  # float32 counts of at most 2**24 values are exact integers


def _counts_histc(x: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """``torch.histc`` counts as float64 (the GPU path: no synchronisation), chunked to stay exact.

    CUDA's histc is flagged non-deterministic because it adds with atomics; adding ones to float32 counts
    below ``2**24`` is exact in any order, so the result is deterministic and, under
    ``torch.use_deterministic_algorithms``, the flag is lifted around the call.
    """
    lift = x.is_cuda and torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if lift:
        torch.use_deterministic_algorithms(False)
    try:
        return sum(torch.histc(c, bins=bins, min=low, max=high).double() for c in x.split(_HISTC_CHUNK))
    finally:
        if lift:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def _counts_floor(x: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """The same counts by index arithmetic and ``bincount`` (the CPU path: faster than histc there)."""
    index = ((x - low) * (bins / (high - low))).floor_().long().clamp_(0, bins - 1)
    return torch.bincount(index, minlength=bins).double()


def bin_counts(x: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """Counts of ``x`` (1-D, already inside ``[low, high]``) in ``bins`` equal bins, float64."""
    return (_counts_histc if x.is_cuda else _counts_floor)(x, bins, low, high)


class ScoreStatistics:
    """Observer of pos/neg score statistics, before and after FT, written once per epoch and rank.

    Args:
        folder: where the per-epoch files go (the trainer's ``<run>/scores``); created when writing.
        bins: histogram bins inside ``hist_range``.
        hist_range: score range of the histograms (outside values land in two extra edge bins).
        hist_every: histogram every ``hist_every``-th update only (1: all; 0: no histograms).
        keep_samples: also store the per-anchor statistics (``samples``), not only their batch mean and
            variance; about ``56 A`` bytes per step, uncompressed.
        flush_every: move the accumulated statistics to the host every that many updates (0: only at
            :meth:`end_epoch`), bounding device memory on very long epochs.
        timing: measure the cost of :meth:`update` (adds a CUDA event pair per update on GPUs).
        rank: this process's rank for the file names (default: the process group's).

    Example:
        >>> stats = ScoreStatistics("/tmp/scores", rank=0)
        >>> stats.update({"pos_logits": torch.randn(4), "neg_logits": torch.randn(4, 16)}, 0.2, step=0)
        True
        >>> stats.pending_steps
        1
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        bins: int = 100,
        hist_range: tuple[float, float] = (-1.0, 1.0),
        hist_every: int = 1,
        keep_samples: bool = False,
        flush_every: int = 0,
        timing: bool = False,
        rank: int | None = None,
    ) -> None:
        if bins < 1:
            raise ConfigError(f"score statistics: bins must be >= 1, got {bins}")
        low, high = float(hist_range[0]), float(hist_range[1])
        if not low < high:
            raise ConfigError(
                f"score statistics: hist_range must be (low, high) with low < high, got {hist_range}"
            )
        if hist_every < 0 or flush_every < 0:
            raise ConfigError(
                f"score statistics: hist_every and flush_every must be >= 0, got "
                f"{hist_every} and {flush_every}"
            )
        self.folder = Path(folder)
        self.bins = int(bins)
        self.hist_range = (low, high)
        self.hist_every = int(hist_every)
        self.keep_samples = keep_samples
        self.flush_every = int(flush_every)
        self.timing = timing
        self.rank = get_rank() if rank is None else int(rank)
        self._host_ms_total = 0.0
        self._device_ms_total = 0.0
        self._timed_updates = 0
        self.last_write_ms = 0.0
        self.reset()

    # ------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything recorded since the last :meth:`end_epoch` (the overhead totals stay)."""
        self._summaries: list[torch.Tensor] = []
        self._samples: list[torch.Tensor] = []
        self._host_summaries: list[np.ndarray] = []
        self._host_samples: list[np.ndarray] = []
        self._steps: list[int] = []
        self._temperatures: list[float] = []
        self._anchors: list[int] = []
        self._negatives: list[int] = []
        self._transformed: list[bool] = []
        self._hist_pos: torch.Tensor | None = None
        self._hist_neg: torch.Tensor | None = None
        self._updates = 0
        self._events: list[tuple[Any, Any]] = []
        self._epoch_host_ms = 0.0

    def pending_state(self) -> dict[str, Any]:
        """What was recorded since the last :meth:`end_epoch`, on the host (for mid-epoch checkpoints)."""
        self._flush()
        names = ("_host_summaries", "_host_samples", "_steps", "_temperatures", "_anchors", "_negatives",
                 "_transformed", "_updates")
        state = {name: getattr(self, name) for name in names}
        for name in ("_host_summaries", "_host_samples"):  # a checkpoint holds tensors, not numpy arrays
            state[name] = [torch.from_numpy(a) for a in state[name]]
        state["_hist_pos"] = None if self._hist_pos is None else self._hist_pos.cpu()
        state["_hist_neg"] = None if self._hist_neg is None else self._hist_neg.cpu()
        return state

    def load_pending_state(self, state: dict[str, Any]) -> None:
        """Continue an epoch from :meth:`pending_state` (a run resumed mid-epoch writes the same file)."""
        self.reset()
        for name, value in state.items():
            if name in ("_host_summaries", "_host_samples"):
                value = [a.numpy() if isinstance(a, torch.Tensor) else a for a in value]
            setattr(self, name, value)

    @property
    def pending_steps(self) -> int:
        """Updates recorded since the last :meth:`end_epoch`."""
        return len(self._steps)

    def hist_edges(self) -> np.ndarray:
        """The ``bins + 1`` histogram edges in score units."""
        return np.linspace(self.hist_range[0], self.hist_range[1], self.bins + 1)

    # ----------------------------------------------------------------------------------------- update
    def update(self, outputs: dict[str, torch.Tensor], temperature: float, step: int) -> bool:
        """Record one step's ``pos_logits [A]``, ``neg_logits [A, K]`` and their ``_raw`` twins.

        Args:
            outputs: a method's ``StepOutput.outputs``; without ``pos_logits`` / ``neg_logits`` (BYOL,
                SimSiam, supervised) nothing is recorded. Without the ``_raw`` twins (FT off) the
                ``raw`` variant repeats the ``ft`` one.
            temperature: ``tau`` of the loss (the logits are ``score / tau``), a Python float (a tensor
                would force a synchronisation).
            step: the global step number, stored with the statistics.

        Returns:
            whether anything was recorded.
        """
        if "pos_logits" not in outputs or "neg_logits" not in outputs:
            return False
        host_start = time.perf_counter()
        pos, neg = outputs["pos_logits"].detach(), outputs["neg_logits"].detach()
        timed_cuda = self.timing and pos.is_cuda
        if timed_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        transformed = "pos_logits_raw" in outputs and "neg_logits_raw" in outputs
        after = anchor_statistics(pos, neg, temperature)
        if transformed:
            pos_raw, neg_raw = outputs["pos_logits_raw"].detach(), outputs["neg_logits_raw"].detach()
            before = anchor_statistics(pos_raw, neg_raw, temperature)
        else:
            pos_raw, neg_raw, before = pos, neg, after
        per_anchor = torch.stack([before, after])  # [V, F, A]
        var, mean = torch.var_mean(per_anchor, dim=2, correction=0)
        self._summaries.append(torch.stack([mean, var], dim=2))  # [V, F, 2]
        if self.keep_samples:
            self._samples.append(per_anchor.float())
        if self.hist_every > 0 and self._updates % self.hist_every == 0:
            self._histogram(((pos_raw, neg_raw), (pos, neg)), temperature)
        self._steps.append(int(step))
        self._temperatures.append(float(temperature))
        self._anchors.append(int(neg.shape[0]))
        self._negatives.append(int(neg.shape[1]))
        self._transformed.append(transformed)
        self._updates += 1
        if self.flush_every > 0 and len(self._summaries) >= self.flush_every:
            self._flush()
        if timed_cuda:
            end.record()
            self._events.append((start, end))
        if self.timing:
            self._epoch_host_ms += 1000.0 * (time.perf_counter() - host_start)
        return True

    def _histogram(self, variants: tuple[tuple[torch.Tensor, torch.Tensor], ...], temperature: float) -> None:
        """Add the scores of both variants to the epoch's histograms (binned in logit units, no sync)."""
        low, high = self.hist_range
        width = (high - low) / self.bins
        tau = float(temperature)
        # Bins in logit units: [low - w, high + w] / tau, with out-of-range values clamped into the edge bins.
        lo, hi = (low - width) / tau, (high + width) / tau
        clamp_lo, clamp_hi = (low - 0.5 * width) / tau, (high + 0.5 * width) / tau
        pos_counts, neg_counts = [], []
        for pos, neg in variants:
            for values, counts in ((pos, pos_counts), (neg, neg_counts)):
                x = values.float().clamp(clamp_lo, clamp_hi).flatten()
                counts.append(bin_counts(x, self.bins + 2, lo, hi))
        pos_h, neg_h = torch.stack(pos_counts), torch.stack(neg_counts)
        if self._hist_pos is None or self._hist_neg is None:
            self._hist_pos, self._hist_neg = pos_h, neg_h
        else:
            self._hist_pos = self._hist_pos.to(pos_h.device) + pos_h  # after a resume it comes from the host
            self._hist_neg = self._hist_neg.to(neg_h.device) + neg_h

    def _flush(self) -> None:
        """Move the statistics accumulated on the device to the host (one transfer)."""
        if self._summaries:
            self._host_summaries.append(torch.stack(self._summaries).cpu().numpy())
            self._summaries = []
        if self._samples:
            if len({s.shape for s in self._samples}) == 1:  # one transfer when every batch had A anchors
                self._host_samples.extend(torch.stack(self._samples).cpu().numpy())
            else:
                self._host_samples.extend(s.cpu().numpy() for s in self._samples)
            self._samples = []

    # -------------------------------------------------------------------------------------- overhead
    def _epoch_timing(self) -> tuple[float, float]:
        """Host and device milliseconds spent in :meth:`update` since the last :meth:`end_epoch`."""
        device = 0.0
        if self._events:
            self._events[-1][1].synchronize()
            device = sum(start.elapsed_time(end) for start, end in self._events)
        return self._epoch_host_ms, device

    def overhead(self) -> dict[str, float]:
        """The measured cost so far (``timing=True``): updates, host and device milliseconds, per update.

        Host time is the wall time spent inside :meth:`update` (launching kernels; on a CPU it is the whole
        cost). Device time is the GPU time between CUDA events around each update (0 on a CPU). The time
        of writing the files is ``last_write_ms``.
        """
        host, device = self._epoch_timing() if self.timing else (0.0, 0.0)
        host += self._host_ms_total
        device += self._device_ms_total
        updates = self._timed_updates + (self._updates if self.timing else 0)
        per = max(1, updates)
        return {
            "updates": float(updates),
            "host_ms": host,
            "device_ms": device,
            "host_ms_per_update": host / per,
            "device_ms_per_update": device / per,
            "last_write_ms": self.last_write_ms,
        }

    # ------------------------------------------------------------------------------------------ write
    def end_epoch(self, epoch: int) -> Path | None:
        """Write the epoch's file (``None`` when nothing was recorded) and start a new epoch.

        Args:
            epoch: the epoch number used in the file name (the trainer's ``metrics.jsonl`` numbering).

        Returns:
            the path written.
        """
        if not self._steps:
            self.reset()
            return None
        write_start = time.perf_counter()
        self._flush()
        host_ms, device_ms = self._epoch_timing() if self.timing else (math.nan, math.nan)
        if self.timing:
            self._host_ms_total += host_ms
            self._device_ms_total += device_ms
            self._timed_updates += self._updates
        updates = max(1, self._updates)
        summary = np.concatenate(self._host_summaries, axis=0)
        hist_pos = (
            self._hist_pos.cpu().numpy() if self._hist_pos is not None else np.zeros((2, self.bins + 2))
        )
        hist_neg = (
            self._hist_neg.cpu().numpy() if self._hist_neg is not None else np.zeros((2, self.bins + 2))
        )
        arrays: dict[str, Any] = {
            "format": np.array(FORMAT),
            "epoch": np.array(int(epoch)),
            "rank": np.array(self.rank),
            "variants": np.array(VARIANTS),
            "fields": np.array(FIELDS),
            "reductions": np.array(REDUCTIONS),
            "steps": np.array(self._steps, dtype=np.int64),
            "temperature": np.array(self._temperatures, dtype=np.float64),
            "anchors": np.array(self._anchors, dtype=np.int64),
            "negatives": np.array(self._negatives, dtype=np.int64),
            "transformed": np.array(self._transformed, dtype=bool),
            "summary": summary,
            "hist_edges": self.hist_edges(),
            "hist_pos": hist_pos,
            "hist_neg": hist_neg,
            "hist_every": np.array(self.hist_every),
            "overhead_host_ms_per_update": np.array(host_ms / updates),
            "overhead_device_ms_per_update": np.array(device_ms / updates),
        }
        if self.keep_samples and self._host_samples:
            width = max(s.shape[-1] for s in self._host_samples)
            samples = np.full(
                (len(self._host_samples), len(VARIANTS), len(FIELDS), width), np.nan, np.float32
            )
            for i, s in enumerate(self._host_samples):
                samples[i, :, :, : s.shape[-1]] = s
            arrays["samples"] = samples
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / score_file_name(int(epoch), self.rank)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
        self.reset()
        self.last_write_ms = 1000.0 * (time.perf_counter() - write_start)
        return path


def read_score_file(path: str | os.PathLike) -> dict[str, Any]:
    """One per-epoch file as a dict of numpy arrays (names as in the module docstring; strings as lists).

    Raises:
        ValueError: when the file is not a score-statistics file of a known format.
    """
    with np.load(path, allow_pickle=False) as data:
        out: dict[str, Any] = {key: data[key] for key in data.files}
    if str(out.get("format", "")) != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format {out.get('format')!r})")
    for key in ("variants", "fields", "reductions"):
        out[key] = [str(v) for v in out[key]]
    for key in ("format",):
        out[key] = str(out[key])
    for key in ("epoch", "rank", "hist_every"):
        out[key] = int(out[key])
    return out


class ScoreStatisticsObserver(Observer):
    """:class:`ScoreStatistics` of every training step, one file per epoch and rank in ``<run>/scores``.

    The rows of the current epoch are rank-local state: a mid-epoch checkpoint keeps them, so a resumed run
    writes the same file as the uninterrupted one.
    """

    rank_local_state = True

    def __init__(self, stats: ScoreStatistics) -> None:
        self.stats = stats

    def on_start(self, run: Run) -> None:
        for old in self.stats.folder.glob(f"epoch_*.rank{run.rank}.npz"):  # epochs after the checkpoint
            if int(old.name.split("_")[1].split(".")[0]) > run.epoch:
                old.unlink()

    def on_step_end(self, run: Run, step_output: Any) -> None:
        self.stats.update(step_output.outputs, run.method.logit_temperature, run.step)

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        self.stats.end_epoch(run.epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stats.pending_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_pending_state(dict(state))


@register_observer("score_statistics")
def score_statistics_observer(run: Run) -> ScoreStatisticsObserver:
    """``score_statistics``: needs a method whose step outputs carry logits (``Method.logit_temperature``)."""
    if run.method.logit_temperature is None:
        raise ConfigError(f"observer score_statistics needs a contrastive method with logits; method "
                          f"{type(run.method).name!r} has none (remove score_statistics from the config list observers)")
    return ScoreStatisticsObserver(ScoreStatistics(run.out / "scores", rank=run.rank))
