"""A run's life in MLflow, and what it holds (the tracking schema of ``docs/mlflow.md``).

- one experiment per launch name; one parent run per launch (``stage=launch``);
- one child run per trial (``stage=adapt``) and per training on a source tile
  (``stage=pretrain``), tagged ``stage, scenario, source, target, method, fold, objective``
  (+ ``selection_uses_target_labels``, ``launch_id``, ``group``, ``trial_key``; names and
  tags: :mod:`.run_names`);
- params: the full resolved method config; metrics per epoch (step = epoch), then the
  final selection metrics (``final_<name>``), the target test metrics and timings once, at
  :data:`FINAL_STEP` for every method (MLflow's chart view shows them as bars per run);
  pretraining runs log source metrics only; the launch run logs the report's numbers;
- artifacts: the model (``mlflow.pytorch.load_model``) and a self-contained parcel
  classifier (``mlflow.pyfunc``), confusion-matrix and shift-score plots, the per-class
  report (JSON and CSV), the predicted class of every target test parcel
  (:data:`PREDICTIONS_ARTIFACT`, which the report compares between methods); the data as a
  dataset input; system metrics.

**This module is the only code that sets a run's status**, in the driver and in trials:
:func:`open_run` (RUNNING: created, or continued by a retry or ``--resume``),
:func:`resume_launch`, :func:`finish` (FINISHED), :func:`stopped_early` (FINISHED, tagged
``stopped_early=asha`` and ``epochs_run``: the scheduler's choice, not a failure),
:func:`fail` (FAILED with its error; a divergence also tags where), :func:`record_failure`
(a trial that died before it opened its run), :func:`kill_interrupted` (KILLED, tagged
``interrupted``: Ctrl-C, or a trial an interrupted launch started). Runs are addressed by
explicit ids through :class:`mlflow.MlflowClient` (no global active run), and found again by
tag.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from timematch.errors import NonFiniteLoss
from timematch.runner.run_names import SOURCE_TAGS, pretrain_run_key, quoted
from timematch.runner.waiting import retry, say, short_error

if TYPE_CHECKING:
    from timematch.training import StepPath


#: The step of every metric logged once per run (final, selection, test, timings, a launch's
#: report): one x for every method, whatever its number of epochs.
FINAL_STEP = 0
#: Requirements written with logged models: writing them skips MLflow's slow inference.
PIP_REQUIREMENTS = ["torch", "numpy", "timematch"]


#: A trial's predicted class index per labelled target test parcel, in the split's order: a
#: ``.npy`` int16 vector (read back with ``allow_pickle=False``).
PREDICTIONS_ARTIFACT = "target_test_predictions.npy"


def log_predictions(mlflow_client, run_id: str, predictions) -> None:
    """Log ``predictions`` (a 1-d integer array) as the run's :data:`PREDICTIONS_ARTIFACT`."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / PREDICTIONS_ARTIFACT
        np.save(path, np.asarray(predictions, dtype=np.int16), allow_pickle=False)
        retry(lambda: mlflow_client.log_artifact(run_id, str(path)))


def read_predictions(mlflow_client, run_id: str):
    """The run's :data:`PREDICTIONS_ARTIFACT` (None for a run without one: an older launch's)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as directory:
        try:
            path = retry(lambda: mlflow_client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, directory))
            return np.load(path, allow_pickle=False)
        except (MlflowException, OSError, ValueError):
            return None


def logged_steps(mlflow_client, run_id: str, key: str) -> set[int]:
    """The steps at which metric ``key`` is already in the run's history."""
    return {m.step for m in retry(lambda: mlflow_client.get_metric_history(run_id, key))}


def find_source_run(mlflow_client, key: str) -> Any:
    """The finished pretraining run of source model ``key``, in any experiment (a later
    launch of another name reuses the cached model), or None."""
    from mlflow.entities import ViewType

    experiments = retry(lambda: mlflow_client.search_experiments(view_type=ViewType.ALL, max_results=1000))
    clauses = " and ".join(f"tags.{k} = {quoted(v)}" for k, v in pretrain_run_key(key).items())
    runs = retry(lambda: mlflow_client.search_runs(
        [e.experiment_id for e in experiments], filter_string=f"{clauses} and attributes.status = 'FINISHED'",
        max_results=1, order_by=["attributes.start_time DESC"]))
    return runs[0] if runs else None


def find_run(mlflow_client, experiment_id: str, tags: Mapping[str, str], statuses: tuple[str, ...] = ()) -> Any:
    """The most recent run of the experiment carrying every tag of ``tags`` (and one of ``statuses``)."""
    clauses = [f"tags.{key} = {quoted(value)}" for key, value in tags.items()]
    runs = retry(lambda: mlflow_client.search_runs(
        [experiment_id], filter_string=" and ".join(clauses), max_results=100,
        order_by=["attributes.start_time DESC"],
    ))
    # (the search grammar compares status with one value only, so several are filtered here)
    return next((run for run in runs if not statuses or run.info.status in statuses), None)


def log_dataset(mlflow_client, run_id: str, name: str, digest: str, source: Mapping[str, Any],
                profile: Mapping[str, Any], context: str) -> None:
    """Record the data a run used as an MLflow dataset input: which tile and split, its sizes
    and the cache's fingerprint (``digest``), not the pixels."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:36], source_type="timematch",
                      source=json.dumps(dict(source), default=str), profile=json.dumps(dict(profile), default=str))
    retry(lambda: mlflow_client.log_inputs(
        run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]))


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, and GPU utilisation and memory where NVML sees a
    GPU) of this process's machine, sampled into a run while the ``with`` block runs."""

    def __init__(self, uri: str, run_id: str, every_s: float = 5.0) -> None:
        self.uri, self.run_id, self.every_s = uri, run_id, every_s
        self.monitor = None

    def __enter__(self) -> "SystemMetrics":
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.every_s, resume_logging=True,
                                            tracking_uri=self.uri)
        self.monitor.start()
        return self

    def __exit__(self, *exc) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        monitor.finish()
        try:  # the samples since the last publication (all of them in a run shorter than every_s)
            tail = monitor.aggregate_metrics()
            if tail:
                monitor.publish_metrics(tail)
                monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - system metrics never fail a trial
            say(f"[tracking] system metrics of run {self.run_id} not logged: {short_error(err)}")


def open_run(mlflow_client, experiment_id: str, key_tags: Mapping[str, str], tags: Mapping[str, str],
             params: Mapping[str, Any], run_name: str, parent_run_id: str | None,
             reuse_finished: bool = True, refresh: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Continue the run identified by ``key_tags`` (a retried or resumed trial), else create it.

    Returns ``(run_id, finished)``: ``finished`` when that run already completed (with
    ``reuse_finished=False`` a completed run is left alone and a new one created). A continued
    run gets the tags of ``refresh`` anew (where this attempt runs: another node, maybe).
    """
    from mlflow.entities import Param, RunTag

    statuses = () if reuse_finished else ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
    existing = find_run(mlflow_client, experiment_id, key_tags, statuses)
    if existing is not None:
        run_id = existing.info.run_id
        if existing.info.status == "FINISHED":
            return run_id, True
        retry(lambda: mlflow_client.update_run(run_id, status="RUNNING"))
        if "error" in existing.data.tags and "diverged_epoch" not in existing.data.tags:
            retry(lambda: mlflow_client.delete_tag(run_id, "error"))  # a divergence's stays: it is refused
        if "interrupted" in existing.data.tags:  # continued now
            retry(lambda: mlflow_client.delete_tag(run_id, "interrupted"))
        attempt = int(existing.data.tags.get("attempt", "1")) + 1
        fresh = [RunTag(k, str(v)) for k, v in {**(refresh or {}), "attempt": attempt}.items()]
        retry(lambda: mlflow_client.log_batch(run_id, tags=fresh))
        return run_id, False
    all_tags = {**SOURCE_TAGS, **tags, **(refresh or {}), **key_tags, "attempt": "1"}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = retry(lambda: mlflow_client.create_run(experiment_id, tags=all_tags, run_name=run_name))
    run_id = run.info.run_id
    retry(lambda: mlflow_client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()]))
    return run_id, False


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if _is_number(value)]
    if batch:
        retry(lambda: mlflow_client.log_batch(run_id, metrics=batch))


#: How a run's training steps ran (:class:`timematch.training.StepPath`'s fields) -> its tags.
STEP_PATH_TAGS = {"path": "step_path", "reason": "step_path_reason", "precision": "precision", "placement": "tiles"}


def tag_step_path(mlflow_client, run_id: str, step_path: StepPath) -> None:
    """Tag a run with how its steps ran: ``step_path`` (``cuda_graph`` or ``eager``) and the
    reason (why a GPU run fell back to eager, say), ``precision``, ``tiles`` (where they were)."""
    values = step_path.to_dict()
    for key, tag in STEP_PATH_TAGS.items():
        if values.get(key):
            retry(lambda t=tag, v=str(values[key]): mlflow_client.set_tag(run_id, t, v[:5000]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fail(mlflow_client, run_id: str, err: BaseException | str, traceback_text: str | None = None) -> None:
    """Tag a run with its error (first 5000 characters) and end it as FAILED.

    A non-finite loss also tags where it happened (``diverged_epoch``, ``diverged_step``):
    a retry of the trial then ends at once (:func:`refuse_if_diverged`) instead of training
    into the same divergence again.
    """
    error = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    retry(lambda: mlflow_client.set_tag(run_id, "error", error[:5000]))
    if isinstance(err, NonFiniteLoss):
        for key, value in (("diverged_epoch", err.epoch), ("diverged_step", err.step)):
            retry(lambda k=key, v=value: mlflow_client.set_tag(run_id, k, str(v)))
    if traceback_text:
        retry(lambda: mlflow_client.log_text(run_id, traceback_text, "error.txt"))
    retry(lambda: mlflow_client.set_terminated(run_id, status="FAILED"))


def record_failure(mlflow_client, experiment_id: str, tags: Mapping[str, str], summary: str,
                   traceback_text: str | None) -> None:
    """A trial that died before it could open its run: a FAILED run with its tags and error."""
    run = retry(lambda: mlflow_client.create_run(experiment_id, tags=dict(tags)))
    fail(mlflow_client, run.info.run_id, summary, traceback_text)


def log_attempt_error(mlflow_client, run_id: str, attempt: str, text: str) -> None:
    """The whole text of a failed attempt that is retried (``errors/attempt-<n>.txt``); the
    run stays RUNNING: its retry continues it."""
    retry(lambda: mlflow_client.log_text(run_id, text, f"errors/attempt-{attempt}.txt"))


def finish(mlflow_client, run_id: str) -> None:
    """End a run that did all it was asked: FINISHED."""
    retry(lambda: mlflow_client.set_terminated(run_id, status="FINISHED"))


def stopped_early(mlflow_client, run_id: str, epochs: Any) -> None:
    """A trial that ASHA stopped: FINISHED (the scheduler's choice, not a failure), tagged
    ``stopped_early=asha`` and ``epochs_run``; the report leaves it out (no test metrics)."""
    from mlflow.entities import RunTag

    retry(lambda: mlflow_client.log_batch(run_id, tags=[RunTag("stopped_early", "asha"),
                                                         RunTag("epochs_run", str(epochs))]))
    finish(mlflow_client, run_id)


def resume_launch(mlflow_client, run_id: str) -> None:
    """A launch continued with ``--resume``: its run RUNNING again, tagged ``resumed``."""
    retry(lambda: mlflow_client.update_run(run_id, status="RUNNING"))
    retry(lambda: mlflow_client.set_tag(run_id, "resumed", "true"))
    if "interrupted" in retry(lambda: mlflow_client.get_run(run_id)).data.tags:
        retry(lambda: mlflow_client.delete_tag(run_id, "interrupted"))


def kill_interrupted(mlflow_client, experiment_id: str, launch_id: str, also: tuple[str, ...] = (),
                     stage: str | None = None) -> int:
    """End the launch's RUNNING runs (of ``stage`` only, when given) and the runs ``also`` as
    KILLED, tagged ``interrupted=true``: a Ctrl-C (the launch run and its trials), or trials an
    interrupted launch started after Tune last saved its state. ``--resume`` continues each
    in the same run. Returns how many were closed."""
    query = f"tags.launch_id = {quoted(launch_id)} and attributes.status = 'RUNNING'"
    if stage:
        query += f" and tags.stage = {quoted(stage)}"
    found = retry(lambda: mlflow_client.search_runs([experiment_id], query, max_results=1000))
    closed = {*also, *(run.info.run_id for run in found)}
    for run_id in closed:
        retry(lambda r=run_id: mlflow_client.set_tag(r, "interrupted", "true"))
        retry(lambda r=run_id: mlflow_client.set_terminated(r, status="KILLED"))
    return len(closed)


def refuse_if_diverged(mlflow_client, run_id: str) -> None:
    """Raise the recorded :class:`NonFiniteLoss` again when an earlier attempt of this run diverged."""
    tags = retry(lambda: mlflow_client.get_run(run_id)).data.tags
    if "diverged_epoch" in tags:
        epoch, step = int(tags["diverged_epoch"]), int(tags.get("diverged_step", 0))
        error, note = tags.get("error", "").removeprefix("NonFiniteLoss: "), " (not retried: it would diverge again)"
        raise NonFiniteLoss(error if error.endswith(note) else error + note, epoch, step, "")


def log_models(uri: str, run_id: str, predictor, input_example: Mapping[str, Any]) -> dict[str, str]:
    """Log the run's models; returns their URIs (the run stays open: :func:`finish` ends it).

    ``parcel_classifier`` (:mod:`timematch.runner.serving`): a pyfunc model that predicts
    class names and probabilities from raw parcels with nothing else on disk (its weights,
    classes, band statistics and positional settings travel with it, nothing is unpickled);
    ``pytorch_module``: the module itself (``mlflow.pytorch.load_model``). Explicit pip
    requirements, since inferring them costs seconds per model.
    """
    from timematch.runner.serving import log_parcel_model

    return retry(lambda: log_parcel_model(uri, run_id, predictor, dict(input_example),
                                          pip_requirements=PIP_REQUIREMENTS), what="logging the model")
