"""One trial's body, whichever its stage: the skeleton a training on a source tile (stage 1)
and an adaptation trial (stage 2) share.

:func:`trial_run` opens the trial's MLflow run (or continues it: a retried or resumed trial
keeps its run), refuses a run whose earlier attempt diverged, logs the data it reads, finds
the trial's resumable state, and on any error ends the run as FAILED with its traceback and
re-raises (Tune then retries it). The
:class:`TrialRun` it yields logs each epoch, saves the state and reports to Tune
(:meth:`TrialRun.on_epoch`), samples system metrics while the training runs
(:meth:`TrialRun.measured`), then logs the final metrics and the models and ends the run
(:meth:`TrialRun.finish`).

Both stages resume the same way: after every epoch the trial's
:class:`~timematch.checkpoint.TrainingState` is written to a file of its own (a training on
a source tile: beside its cached model, since another launch may continue it; an adaptation
trial: in its launch's folder, by Tune's trial id, which a retry and ``--resume`` keep), and a
new attempt continues from it, logging the epochs its run is missing once.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import tune

from timematch.checkpoint import EpochReport, TrainingState
from timematch.data.packed import PackedTile
from timematch.data.splits import make_split
from timematch.evaluation import pick_device
from timematch.runner import runs
from timematch.training import StepPath

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from timematch.runner.plan import LaunchPlan
    from timematch.serving import ParcelPredictor

#: An epoch's metrics as its run logs them and Tune sees them.
MetricFilter = Callable[[Mapping[str, Any]], dict[str, float]]


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics (bools and texts left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class TrialRun:
    """A trial's open run: what the trial body logs and reports through."""

    client: MlflowClient
    run_id: str
    tracking_uri: str
    state_path: Path
    #: the run has finished (here, or before an interruption Tune did not record)
    finished: bool = False
    #: the state to continue from (None: train from the start)
    resume_state: TrainingState | None = None
    #: which of an epoch's metrics the run logs and Tune sees
    metric_filter: MetricFilter = numbers
    #: epochs from this one on are reported with the final metrics (ASHA stops a trial at its
    #: last report, so the last epoch's waits until everything is logged); None: every epoch
    report_until: int | None = None
    #: every epoch's log lines, ``epoch N: ...``
    logs: list[str] = field(default_factory=list)
    #: where the epochs' and the end's metrics go: Tune (a member of an array of trials reports
    #: to its Optuna study instead, :mod:`timematch.runner.trial_arrays`)
    report: Callable[[dict[str, Any]], None] = field(default=lambda metrics: tune.report(metrics))

    def on_epoch(self, report: EpochReport, state: Callable[[], TrainingState | None]) -> None:
        """The training's ``on_epoch``: log the epoch, save the state to resume from, report to Tune."""
        metrics = self.metric_filter(report.metrics)
        runs.log_metrics(self.client, self.run_id, metrics, step=report.epoch)
        self.logs.extend(f"epoch {report.epoch}: {line}" for line in report.logs)
        if self.report_until is not None and report.epoch >= self.report_until:
            return
        captured = state()
        if captured is not None:  # None: an epoch that only evaluated, nothing to resume from
            captured.save(self.state_path)
        elif self.report_until is not None:
            return
        self.report({**metrics, "epoch": report.epoch})

    def measured(self) -> runs.SystemMetrics:
        """The training's ``with`` block: MLflow's system metrics sampled into the run meanwhile."""
        return runs.SystemMetrics(self.tracking_uri, self.run_id)

    def log_missing_epochs(self) -> None:
        """The epochs an interrupted attempt trained, logged once: a continued run has them
        already; a new run (the old one was deleted) gets them now."""
        history = self.resume_state.history if self.resume_state is not None else []
        first = next(iter(self.metric_filter(history[0].metrics)), None) if history else None
        have = runs.logged_steps(self.client, self.run_id, first) if first else set()
        for report in history:
            if report.epoch not in have:
                runs.log_metrics(self.client, self.run_id, self.metric_filter(report.metrics), step=report.epoch)

    def finish(self, step_path: StepPath, final: Mapping[str, float], predictor: ParcelPredictor,
               input_example: Mapping[str, Any], report: Mapping[str, Any]) -> None:
        """Tag how the steps ran, log the final metrics and the models, end the run FINISHED,
        drop the state (nothing is left to resume), then report ``report`` to Tune."""
        runs.tag_step_path(self.client, self.run_id, step_path)
        runs.log_metrics(self.client, self.run_id, final, step=runs.FINAL_STEP)
        runs.log_models(self.tracking_uri, self.run_id, predictor, input_example)
        runs.finish(self.client, self.run_id)
        self.finished = True
        self.state_path.unlink(missing_ok=True)
        self.report(dict(report))


@contextmanager
def trial_run(client: MlflowClient, tracking_uri: str, opened: tuple[str, bool], state_path: Path,
              data: Callable[[str], None], metric_filter: MetricFilter = numbers,
              report_until: int | None = None) -> Iterator[TrialRun]:
    """The body of a trial whose run ``opened`` (:func:`runs.open_run`'s ``(run_id, finished)``)
    is: yields its :class:`TrialRun`; a run that had finished is yielded as it is (``finished``)
    for the trial to report its logged results again. ``data(run_id)`` logs the data it reads."""
    run_id, finished = opened
    run = TrialRun(client, run_id, tracking_uri, Path(state_path), finished, metric_filter=metric_filter,
                   report_until=report_until)
    if finished:
        yield run
        return
    try:
        runs.refuse_if_diverged(client, run_id)
        data(run_id)
        if run.state_path.is_file():
            run.resume_state = TrainingState.load(run.state_path)
            run.log_missing_epochs()
        yield run
    except Exception as err:
        if not run.finished:  # an array's member that finished before another one failed stays finished
            runs.fail(client, run_id, err, traceback.format_exc())
        raise


def placement_tags() -> dict[str, str]:
    """Where this trial runs: the Ray node (id and address), the host, and the device."""
    return {"ray_node_id": ray.get_runtime_context().get_node_id(),
            "ray_node_address": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "device": _device_tag()}


def _device_tag() -> str:
    """Where this trial computes: ``cpu`` or ``cuda:N (<GPU name>)`` (N among the GPUs Ray gave it)."""
    device = pick_device()
    if device.type != "cuda":
        return "cpu"
    index = torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def log_data(client: MlflowClient, run_id: str, plan: LaunchPlan, tiles: list[tuple[str, str]], fold: int) -> None:
    """Each tile a run uses as an MLflow dataset input: tile, fold, split sizes, cache fingerprint."""
    data = plan.data_config()
    for tile, role in tiles:
        packed = PackedTile.open(plan.data_root, tile, plan.cache_dir)
        manifest = packed.manifest()
        split = make_split(len(packed), fold, data.split_seed, packed.tile, data.n_folds)
        sizes = {part: int(len(split.part(part))) for part in ("train", "val", "test")}
        runs.log_dataset(
            client, run_id, f"{packed.tile} fold{fold}", str(manifest.get("fingerprint", packed.path.name)),
            {"data_root": plan.data_root, "tile": packed.tile, "cache": str(packed.path)},
            {"fold": fold, "parcels": len(packed), "dates": packed.n_dates, **sizes}, role)
