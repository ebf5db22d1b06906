"""What a run is called and tagged: the names that fit the MLflow UI's name column, the
common tags of a trial's run, the tag keys that find a trial's or a training's run again
(a retried or resumed trial continues its own run), and the names of its logged models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from timematch.methods import get_method


def pretrain_run_key(key: str) -> dict[str, str]:
    """The tags that find the pretraining run of source model ``key``: adaptation runs carry
    ``pretrain_key`` too (the model they start from), so the stage is part of the key."""
    return {"stage": "pretrain", "pretrain_key": key}


def adapt_run_key(launch_id: str, trial_id: str) -> dict[str, str]:
    """The tags that find the run of one adaptation trial of a launch."""
    return {"stage": "adapt", "trial_key": f"{launch_id}/{trial_id}"}


def trial_run_name(scenario: str, method: str, fold: int | None, number: int | str | None,
                   seed: int | None = None) -> str:
    """``DK-FR1 TM f1#2``: scenario, the method's short name, then only what varies within the
    launch: the fold (``None`` with one fold), the seed (``None`` without ``--seeds``) and the
    trial's number in its group (``#0`` is the defaults; ``None`` with one trial per group).
    So a name fits the UI's name column (about 15 characters in a launch's nested rows) and
    its visible part tells the launch's runs apart; the full method name, fold, seed and Ray's
    trial id are the run's tags."""
    trial = "" if number is None else (f"#{number}" if isinstance(number, int) else f" {number}")
    return f"{scenario} {get_method(method).short_name}{_suffix(fold, seed, trial)}"


def pretrain_run_name(tile: str, fold: int | None, seed: int | None = None, method: str | None = None) -> str:
    """``pretrain DK``, with the fold and seed where the launch has several (``pretrain DK f1s0``);
    a method's own training on the source tile alone (shift augmentation) is ``train DK SA``."""
    if method:
        return f"train {tile} {get_method(method).short_name}{_suffix(fold, seed)}"
    return f"pretrain {tile}{_suffix(fold, seed)}"


#: The source a run and its logged models show ("logged from", the runs table's Source column):
#: the project's entry point, not the process that wrote them (a Ray worker's ``default_worker.py``).
SOURCE_TAGS = {"mlflow.source.name": "launch.py", "mlflow.source.type": "LOCAL"}


def training_method_tag(method: str) -> str:
    """The ``method`` tag of a training on a source tile alone (stage 1): ``pretrain:source_only``
    for a source model, ``pretrain:shift_aug`` for shift augmentation's; never a method's own
    name, so grouping runs by method keeps these trainings apart from the trials that evaluate
    or adapt them (their ``stage`` tag is ``pretrain``; ``trains`` holds the method's name)."""
    return f"pretrain:{method}"


def logged_model_name(tags: Mapping[str, str], artifact: str) -> str:
    """A logged model's name that says what it is: ``timematch-DK-FR1-parcel_classifier``, or
    ``pretrain_source_only-DK-pytorch_module`` for a training on a source tile (from the run's
    tags; MLflow refuses ``/ : . % " '`` in a model's name, so they become ``_``)."""
    where = tags.get("scenario") if tags.get("stage") == "adapt" else tags.get("source")
    name = "-".join(part for part in (tags.get("method"), where, artifact) if part)
    return re.sub(r"[/:.%\"']", "_", name)


def _suffix(fold: int | None, seed: int | None, trial: str = "") -> str:
    text = ("" if fold is None else f"f{fold}") + ("" if seed is None else f"s{seed}") + trial
    return f" {text.strip()}" if text else ""


def quoted(value: Any) -> str:
    """``value`` as a string literal of an MLflow search filter. MLflow's parser does not
    unescape ``\'`` inside single quotes (a value with one then matches nothing), so a value
    holding ``'`` is written in double quotes (one holding both quote characters matches no run)."""
    text = str(value)
    if "'" in text and '"' not in text:
        return f'"{text}"'
    return "'" + text.replace("'", "\\'") + "'"


def run_tags(*, stage: str, scenario: str, source: str, target: str, method: str, fold: int, objective: str,
             uses_target_labels: bool, **extra: Any) -> dict[str, str]:
    """The tags every run of a trial or training carries (``extra``: more, None left out)."""
    tags = {
        "stage": stage, "scenario": scenario, "source": source, "target": target, "method": method,
        "fold": str(fold), "objective": objective,
        "selection_uses_target_labels": "true" if uses_target_labels else "false",
    }
    tags.update({key: str(value) for key, value in extra.items() if value is not None})
    return tags
