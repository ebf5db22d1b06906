"""Driver-side Tune callbacks: terminal progress, and the final status of each trial's MLflow run.

:class:`ProgressPrinter` prints one line when a trial starts, reports an epoch, finishes,
is stopped early or fails, the best trial so far of each group, and every
``status_every_s`` seconds a count of running, finished and failed trials.

:class:`RunStatusCallback` closes the MLflow runs that a trial could not close itself: a
trial stopped by ASHA (ended as FINISHED: it did what the scheduler asked, tagged
``stopped_early=asha`` and ``epochs_run``; the report leaves it out, as it has no test metrics) or one that died
(ended as FAILED with its error, also when it failed before it could open its run).

Both are pickled with the Tuner (``Tuner.restore`` brings them back), so they hold no
clients or open files.
"""

from __future__ import annotations

import functools
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from timematch.runner import run_names, runs, tracking
from timematch.runner.trial_config import AdaptConfig, TrainingConfig, config_key


def _never_raise(method: Callable) -> Callable:
    """Tune turns an exception in a callback into a failure of the trial: report it instead."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"{type(self).__name__}.{method.__name__}: {type(err).__name__}: {err}", stacklevel=2)
            return None

    return wrapper


#: Ray's failures that are not the trial's own exception, in a few words (the whole text, with
#: Ray's hints on OOM and SIGKILL, goes to the run's error artifact): pattern -> cause.
CAUSES = (
    (re.compile(r"OutOfMemoryError|memory monitor|killed .* due to memory", re.I),
     "its worker was killed for lack of memory (Ray's memory monitor)"),
    (re.compile(r"NodeDiedError|node .* (died|was lost|is dead)|raylet .* died", re.I), "its node was lost"),
    (re.compile(r"ActorDiedError|RayActorError|WorkerCrashedError|worker process has died|"
                r"actor died unexpectedly", re.I),
     "its worker process died (killed, out of memory or crashed)"),
    (re.compile(r"ActorUnavailableError|ActorUnschedulableError", re.I), "its worker could not be placed"),
)
SHORT = 500


def short_cause(text: str) -> str:
    """A failure's cause in a few words: a known Ray failure by name, else the exception's line
    (the last line of the traceback that is not a frame), cut to :data:`SHORT` characters."""
    for pattern, cause in CAUSES:
        if pattern.search(text):
            return cause
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "error (no details recorded)"
    # The last line of a traceback is the exception; Ray wraps it, so skip its own frames.
    summary = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), lines[-1])
    return summary if len(summary) <= SHORT else summary[: SHORT - 3] + "..."


def _error_text(trial) -> tuple[str, str | None]:
    """(its cause in a few words, the full text) of a failed trial."""
    path = getattr(trial, "error_file", None)
    text = None
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    if not text:
        return "error (no details recorded)", None
    return short_cause(text), text


class ProgressPrinter(Callback):
    """One line per trial event on stdout, prefixed with the stage and the time since it began."""

    def __init__(self, stage: str, labels: dict[str, str], total: int, objective: str,
                 status_every_s: float = 30.0, show_epochs: bool = True) -> None:
        self.stage = stage
        self.labels = labels  # config value ("group" id or "task" key) -> readable name
        self.total = total
        self.objective = objective
        self.status_every_s = status_every_s
        self.show_epochs = show_epochs
        self._started = time.monotonic()
        self._last_status = 0.0
        self._best: dict[str, tuple[float, str]] = {}
        self.counts = {"done": 0, "stopped": 0, "failed": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune.restore unpickles the callbacks of the interrupted launch: time from now on.
        self.__dict__.update(state)
        self._started = time.monotonic()
        self._last_status = 0.0

    @property
    def out(self) -> TextIO:
        return sys.stdout

    def _print(self, text: str) -> None:
        elapsed = time.monotonic() - self._started
        print(f"[{self.stage} {int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {text}", file=self.out, flush=True)

    def _name(self, trial) -> str:
        key = config_key(trial.config)
        return f"{self.labels.get(key, key)} [{trial.trial_id}]"

    @_never_raise
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        params = AdaptConfig.of(trial.config).params if self.stage == "adapt" else {}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        self._print(f"start   {self._name(trial)}" + (f"  {shown}" if shown else ""))

    @_never_raise
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if not self.show_epochs or "epoch" not in result or result.get("final"):
            return
        name = self.objective if self.objective in result else "source_val_f1"
        value = result.get(name)
        shown = f"{name} {value:.4f}" if value is not None else ""
        self._print(f"epoch {int(result['epoch']):>3} {self._name(trial)}  {shown}")

    @_never_raise
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if "members" in result:  # an array of trials (timematch.runner.trial_arrays)
            ends = {end: int(result.get(f"members_{end}", 0)) for end in ("done", "stopped", "failed")}
            for end, count in ends.items():
                self.counts[end] += count
            best = (f"; best {self.objective} {result[self.objective]:.4f} (member {int(result['best_member'])}), "
                    f"test_macro_f1 {result['test_macro_f1']:.4f}" if self.objective in result else "")
            self._print(f"done    {self._name(trial)}  array of {int(result['members'])}: "
                        + ", ".join(f"{n} {end}" for end, n in ends.items()) + best)
        elif "test_macro_f1" in result:
            self.counts["done"] += 1
            value = result.get(self.objective)
            group = config_key(trial.config)
            line = (f"done    {self._name(trial)}  {self.objective} {value:.4f}  "
                    f"test_macro_f1 {result['test_macro_f1']:.4f}")
            if value is not None and (group not in self._best or value > self._best[group][0]):
                self._best[group] = (value, trial.trial_id)
            if group in self._best:
                best_value, best_trial = self._best[group]
                line += f"  (best of group: {best_trial}, {best_value:.4f})"
            self._print(line)
        elif self.stage == "adapt":
            self.counts["stopped"] += 1
            self._print(f"stopped {self._name(trial)}  by ASHA after epoch {int(result.get('epoch', 0))}")
        else:
            self.counts["done"] += 1
            what = "reused (cached meanwhile)" if "reused" in result else (
                f"source_val_f1 {result['source_val_f1']:.4f}" if "source_val_f1" in result else "")
            self._print(f"done    {self._name(trial)}  {what}")

    @_never_raise
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.counts["failed"] += 1
        summary, _ = _error_text(trial)
        self._print(f"FAILED  {self._name(trial)}  {summary}")

    @_never_raise
    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        summary, _ = _error_text(trial)
        self._print(f"retry   {self._name(trial)}  after: {summary}")

    @_never_raise
    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self._last_status < self.status_every_s:
            return
        self._last_status = now
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        finished = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        self._print(f"status  {running} running, {pending} pending, {finished} finished, {failed} failed, "
                    f"{self.total} planned")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunStatusCallback(Callback):
    """Ends the MLflow runs of trials that ended without closing their run."""

    def __init__(self, tracking_uri: str, experiment_id: str, launch_id: str, parent_run_id: str, key: str,
                 tags: dict[str, dict[str, str]]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.launch_id = launch_id
        self.parent_run_id = parent_run_id
        self.key = key  # "trial_key" (adaptation) or "pretrain_key"
        self.tags = tags  # config value (group id or task key) -> the run tags of its trials

    @staticmethod
    def _is_array(trial) -> bool:
        """An array of trials: its members' runs end themselves (timematch.runner.trial_arrays)."""
        return bool((trial.config or {}).get("members"))

    def _key_tags(self, trial) -> dict[str, str]:
        if self.key == "pretrain_key":
            return run_names.pretrain_run_key(TrainingConfig.of(trial.config).task)
        return run_names.adapt_run_key(self.launch_id, trial.trial_id)

    @_never_raise
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self._is_array(trial):
            return
        client = tracking.client(self.tracking_uri)
        run = runs.find_run(client, self.experiment_id, self._key_tags(trial), ("RUNNING",))
        if run is not None:  # the trial reported and was stopped before it finished
            runs.stopped_early(client, run.info.run_id, (trial.last_result or {}).get("epoch", "?"))

    @_never_raise
    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A trial about to be retried: the whole text of its failure goes to its run
        (``errors/attempt-<n>.txt``); the terminal shows its cause in a few words."""
        if self._is_array(trial):
            return
        _, text = _error_text(trial)
        client = tracking.client(self.tracking_uri)
        run = runs.find_run(client, self.experiment_id, self._key_tags(trial))
        if run is not None and text:
            runs.log_attempt_error(client, run.info.run_id, run.data.tags.get("attempt", "1"), text)

    @_never_raise
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if self._is_array(trial):
            return
        client = tracking.client(self.tracking_uri)
        summary, text = _error_text(trial)
        run = runs.find_run(client, self.experiment_id, self._key_tags(trial))
        if run is None:  # died before opening its run: record the failure anyway
            tags = {**self.tags.get(config_key(trial.config), {}), **self._key_tags(trial),
                    "launch_id": self.launch_id, "mlflow.parentRunId": self.parent_run_id}
            runs.record_failure(client, self.experiment_id, tags, summary, text)
        elif run.info.status != "FAILED" or "error" not in run.data.tags:
            runs.fail(client, run.info.run_id, summary, text)
