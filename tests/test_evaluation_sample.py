"""What training evaluates each epoch on a large tile: a fixed, seeded, class-stratified sample
of each split part (Domain.evaluation_sample, ``data.eval_parcels``), the same for every trial
of a fold, used by the selection criteria, the source model's validation, the movement probe
and TimeMatch's class prior; the test evaluation of a result stays on the whole split."""

import numpy as np
import pytest
import torch

from timematch.data.dataset import DataConfig, Domain, open_domains
from timematch.data.splits import MIN_PER_CLASS, sample_parcels
from timematch.errors import ConfigError
from timematch.models import build_model
from timematch.movement import MovementProbe
from timematch.selection import epoch_selection

CPU = torch.device("cpu")


def test_a_stratified_sample_is_seeded_sized_and_keeps_every_class():
    rng = np.random.default_rng(0)
    strata = np.repeat(np.array(["meadow", "corn", "rye", "peas"]), [5000, 800, 30, 3])
    parcels = np.arange(len(strata)) * 3 + 7
    order = rng.permutation(len(strata))
    parcels, strata = parcels[order], strata[order]
    sample = sample_parcels(parcels, 500, [1, 2, 3], strata)
    assert len(sample) == 500 and np.all(np.diff(sample) > 0) and np.isin(sample, parcels).all()
    assert np.array_equal(sample, sample_parcels(parcels, 500, [1, 2, 3], strata))  # same seed, same sample
    assert not np.array_equal(sample, sample_parcels(parcels, 500, [1, 2, 4], strata))
    counts = {c: int(np.isin(sample, parcels[strata == c]).sum()) for c in ("meadow", "corn", "rye", "peas")}
    assert counts["peas"] == 3 and counts["rye"] >= MIN_PER_CLASS  # every class, the rare ones kept
    # the rest in proportion: meadow and corn about 5000:800
    assert abs(counts["meadow"] / counts["corn"] - 5000 / 800) < 0.3
    # a budget below the number of classes still keeps one of each
    assert len(np.unique(strata[np.isin(parcels, sample_parcels(parcels, 2, [0], strata))])) == 4
    # the whole set when it is no larger, or when the size is 0; uniform without strata
    assert np.array_equal(sample_parcels(parcels[:40], 40, [0], strata[:40]), np.sort(parcels[:40]))
    assert np.array_equal(sample_parcels(parcels, 0, [0], strata), np.sort(parcels))
    assert len(sample_parcels(parcels, 100, [0])) == 100


def _domains(root, eval_parcels: int, fold: int = 0) -> tuple[Domain, Domain]:
    return open_domains(root, "DK", "FR1", fold, DataConfig(min_parcels=10, eval_parcels=eval_parcels))


def test_every_trial_of_a_fold_evaluates_the_same_sample(synthetic_root):
    source, target = _domains(synthetic_root, 12)
    again_source, again_target = _domains(synthetic_root, 12)  # another trial of the group
    val = source.labelled("val")
    assert len(val) > 12
    sample = source.evaluation_sample(val, "val")
    assert len(sample) == 12 and np.isin(sample, val).all()
    assert np.array_equal(sample, again_source.evaluation_sample(again_source.labelled("val"), "val"))
    assert np.array_equal(target.evaluation_sample(target.split.val, "val"),
                          again_target.evaluation_sample(again_target.split.val, "val"))
    # every source class of the part is in its sample
    assert set(source.class_names[sample]) == set(source.class_names[val])
    # another fold, another part, another purpose: another sample
    other, _ = _domains(synthetic_root, 12, fold=1)
    assert not np.array_equal(sample, other.evaluation_sample(other.labelled("val"), "val"))
    assert not np.array_equal(source.evaluation_sample(source.split.train, "train", by_class=False),
                              source.evaluation_sample(source.split.train, "prior", by_class=False))
    # 0 (the default, as published): the whole part
    whole, _ = _domains(synthetic_root, 0)
    assert np.array_equal(whole.evaluation_sample(whole.labelled("val"), "val"), whole.labelled("val"))
    with pytest.raises(ConfigError, match="eval_parcels"):
        DataConfig(eval_parcels=-1)


def _recording(monkeypatch) -> list[tuple[str, np.ndarray]]:
    seen: list[tuple[str, np.ndarray]] = []
    original = Domain.eval_batches

    def eval_batches(self, parcels, *args, **kwargs):
        seen.append((self.tile, np.asarray(parcels).copy()))
        return original(self, parcels, *args, **kwargs)

    monkeypatch.setattr(Domain, "eval_batches", eval_batches)
    return seen


def test_the_epochs_evaluate_the_sample_and_the_probe_the_whole_split_at_the_end(synthetic_root, monkeypatch):
    source, target = _domains(synthetic_root, 12)
    torch.manual_seed(0)
    model = build_model(num_classes=len(source.classes))
    seen = _recording(monkeypatch)
    epoch_selection(model, source, target, CPU, seed=0)
    sets = {(tile, p.tobytes()) for tile, p in seen}
    assert (target.tile, target.evaluation_sample(target.split.val, "val").tobytes()) in sets
    assert (source.tile, source.evaluation_sample(source.labelled("val"), "val").tobytes()) in sets
    assert (target.tile, target.split.val.tobytes()) not in sets

    seen.clear()
    epoch_selection(model, source, source, CPU)  # a source model's epoch: its validation sample
    assert [p.tolist() for _, p in seen] == [source.evaluation_sample(source.labelled("val"), "val").tolist()]

    probe = MovementProbe(model, target, CPU)
    seen.clear()
    probe.measure(model)  # an epoch: the test split's sample (uniform), twice (weights, statistics only)
    assert [len(p) for _, p in seen] == [12, 12]
    assert np.array_equal(seen[0][1], target.evaluation_sample(target.labelled("test"), "test", by_class=False))
    seen.clear()
    whole = probe.start_predictions
    assert probe.measure(model, predictions=whole)["changed_predictions"] == 0.0  # the result: the whole split
    assert [len(p) for _, p in seen] == [len(target.labelled("test"))]
