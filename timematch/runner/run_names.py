"""What a run is called and tagged: the names that fit the MLflow UI's name column, the
common tags of a trial's run, and the tag keys that find a trial's or a training's run again
(a retried or resumed trial continues its own run)."""

from __future__ import annotations

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


def _suffix(fold: int | None, seed: int | None, trial: str = "") -> str:
    text = ("" if fold is None else f"f{fold}") + ("" if seed is None else f"s{seed}") + trial
    return f" {text.strip()}" if text else ""


def quote(value: str) -> str:
    """``value`` inside single quotes of an MLflow search filter."""
    return str(value).replace("'", "\\'")


def run_tags(stage: str, scenario: str, source: str, target: str, method: str, fold: int, objective: str,
             uses_target_labels: bool, **extra: Any) -> dict[str, str]:
    tags = {
        "stage": stage, "scenario": scenario, "source": source, "target": target, "method": method,
        "fold": str(fold), "objective": objective,
        "selection_uses_target_labels": "true" if uses_target_labels else "false",
    }
    tags.update({key: str(value) for key, value in extra.items() if value is not None})
    return tags
