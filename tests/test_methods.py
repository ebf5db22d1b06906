"""Method parts (EMA, pseudo labels, domain-specific BN), configs, registry, and short
end-to-end runs of every method on CPU."""

import math

import pytest
import torch

from timematch.data.dataset import DataConfig
from timematch.checkpoint import TrainingState
from timematch.errors import ConfigError, DatasetError, TrainingError
from timematch.experiment import ExperimentSpec, PretrainedSource, pretrain_source, run_experiment, source_training
from timematch.methods import build_config, config_fields, method_names
from timematch.data.views import Batch
from timematch.methods.pseudo_label import ema_update, pseudo_labels, supervised_and_pseudo_loss
from timematch.methods.registry import register
from timematch.models import build_model

TINY = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16}


def test_registry_lists_methods_and_rejects_unknown():
    assert {"source_only", "upper_bound", "fixmatch", "timematch", "mmd", "dann", "cdan", "cdan_e", "jumbot",
            "alda", "shift_aug"} <= set(method_names())
    with pytest.raises(ConfigError, match="unknown method 'nope'; valid methods: .*timematch"):
        build_config("nope")
    with pytest.raises(ConfigError, match="unknown config key.*'max_temporal_shift'.*valid keys"):
        build_config("fixmatch", {"max_temporal_shift": 10})
    with pytest.raises(ConfigError, match="registered twice"):
        register("timematch")(type("Dup", (), {"short_name": "DUP"}))
    with pytest.raises(ConfigError, match="short_name must be 1-6 characters"):
        register("no_short_name")(type("NoShort", (), {}))
    with pytest.raises(ConfigError, match="short_name 'TM' is already 'timematch'"):
        register("another_tm")(type("Another", (), {"short_name": "TM"}))
    with pytest.raises(ConfigError, match="trains_on must be one of .*'source'.*got 'both tiles'"):
        register("odd_reads")(type("Odd", (), {"short_name": "ODD", "trains_on": "both tiles"}))
    assert not {"no_short_name", "another_tm", "odd_reads"} & set(method_names())


def test_trial_run_names_fit_the_ui_column():
    from timematch.runner.run_names import pretrain_run_name, trial_run_name

    # only what varies within the launch: fold (several folds), seed (--seeds), trial (--trials)
    assert trial_run_name("DK-FR1", "timematch", None, None) == "DK-FR1 TM"
    assert trial_run_name("DK-FR1", "timematch", None, 12) == "DK-FR1 TM #12"
    assert trial_run_name("DK-FR1", "timematch", 2, 0) == "DK-FR1 TM f2#0"
    assert trial_run_name("FR1-FR2", "cdan_e", 2, 3, seed=1) == "FR1-FR2 CDAN+E f2s1#3"
    assert trial_run_name("DK-AT1", "mmd", None, "e50d47dd") == "DK-AT1 MMD e50d47dd"  # no number: the trial id
    assert pretrain_run_name("DK", None) == "pretrain DK" and pretrain_run_name("DK", 0, 1) == "pretrain DK f0s1"
    assert pretrain_run_name("FR1", None, None, "shift_aug") == "train FR1 SA"  # a method's own source training


def test_published_defaults():
    tm = build_config("timematch")
    assert (tm.pseudo_threshold, tm.trade_off, tm.ema_decay, tm.lr, tm.epochs, tm.steps_per_epoch) == (
        0.9, 2.0, 0.9999, 1e-4, 20, 500)
    assert (tm.max_temporal_shift, tm.estimator, tm.sample_size) == (60, "am", 100)
    so = build_config("source_only")
    assert (so.lr, so.epochs, so.shift_aug, so.focal_gamma) == (1e-3, 100, False, 1.0)
    assert "max_temporal_shift" not in config_fields("fixmatch")


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"pseudo_threshold": 0.0}, r"pseudo_threshold=0.0 is out of range; allowed: \(0.0, 1.0\]"),
        ({"pseudo_threshold": 1.5}, "pseudo_threshold"),
        ({"epochs": -1}, r"epochs=-1 is out of range"),
        ({"max_temporal_shift": 101}, r"max_temporal_shift=101 is out of range; allowed: \[0, 100\]"),
        ({"estimator": "xx"}, "valid: am, is, ent, acc"),
    ],
)
def test_config_ranges(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config("timematch", overrides)


def test_ema_update_arithmetic():
    student, teacher = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(2.0)
        teacher.weight.fill_(1.0)
        student.running_mean.fill_(4.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, decay=0.9)
    assert torch.allclose(teacher.weight, torch.full((3,), 1.1))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.4))
    assert int(teacher.num_batches_tracked) == 7
    ema_update(teacher, student, decay=0.0)
    assert torch.allclose(teacher.weight, student.weight)


class FixedTeacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.seen_positions = None

    def forward(self, pixels, mask, positions, geom=None, **kwargs):
        self.seen_positions = positions
        return self.logits, None


def test_pseudo_label_masking_and_shift():
    logits = torch.log(torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.02, 0.98]]))
    teacher = FixedTeacher(logits)
    weak = Batch(pixels=torch.zeros(3, 2, 1, 10), mask=torch.ones(3, 1, dtype=torch.bool),
                 positions=torch.tensor([[0, 10]] * 3), geom=torch.zeros(3, 4), label=torch.full((3,), -1),
                 index=torch.arange(3))
    labels, keep = pseudo_labels(teacher, weak.shifted(torch.tensor(7)), threshold=0.9)
    assert labels.tolist() == [0, 0, 1] and keep.tolist() == [True, False, True]
    assert teacher.seen_positions.tolist() == [[7, 17]] * 3


def random_batch(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return Batch(pixels=torch.randn(n, 6, 8, 10, generator=g) + shift, mask=torch.ones(n, 8, dtype=torch.bool),
                 positions=torch.arange(0, 60, 10).repeat(n, 1), geom=torch.zeros(n, 4),
                 label=torch.randint(0, 3, (n,), generator=g), index=torch.arange(n), padded=False)


def test_domain_specific_bn_keeps_statistics_apart():
    torch.manual_seed(0)
    model = build_model(num_classes=3)
    model.train()
    torch.manual_seed(1)
    source = random_batch(8, 0)
    a, b = random_batch(8, 1, shift=0.0), random_batch(8, 2, shift=5.0)
    pseudo = torch.zeros(8, dtype=torch.long)

    confident = torch.ones(8, dtype=torch.bool)

    def source_loss(target, dsbn, static):
        torch.manual_seed(3)  # same dropout masks
        return float(supervised_and_pseudo_loss(model, source, target, pseudo, confident, 1.0, 1.0, dsbn,
                                                static)[1]["source_loss"])

    for static in (True, False):  # the GPU's shape-static form and the CPU's selecting one
        assert source_loss(a, True, static) == pytest.approx(source_loss(b, True, static), abs=1e-6)
        assert source_loss(a, False, static) != pytest.approx(source_loss(b, False, static), abs=1e-4)


# -- end to end on the small synthetic dataset -------------------------------------------


def tiny_spec(root, cache, method, **changes):
    spec = ExperimentSpec(
        data_root=root, source="DK", target="FR1", method=method, method_config=dict(TINY),
        pretrain_config=dict(TINY), data=DataConfig(min_parcels=10), cache_dir=cache,
    )
    return spec.replace(**changes)


# every registered method runs end to end and resumes exactly: tests/test_method_contract.py


@pytest.mark.slow
def test_timematch_reports_its_shift(synthetic_root, tmp_path):
    spec = tiny_spec(synthetic_root, tmp_path, "timematch", method_config=dict(TINY, sample_size=2))
    reports = []
    result = run_experiment(spec, on_epoch=lambda report, state: reports.append(report))
    assert -60 <= result.metrics["estimated_shift"] <= 60 and result.shift_scores
    assert "estimated_shift" in reports[-1].metrics


@pytest.mark.slow
def test_same_seed_same_result_and_resume(synthetic_root, tmp_path):
    spec = tiny_spec(synthetic_root, tmp_path, "fixmatch", method_config=dict(TINY, epochs=2))
    pretrained = pretrain_source(spec)
    states = []
    first = run_experiment(spec, pretrained, on_epoch=lambda r, s: states.append(s()))
    second = run_experiment(spec, pretrained)
    assert first.metrics == second.metrics
    for (k, v), w in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(v, w), k
    # resuming after epoch 1 gives the same final model as running straight through
    saved = states[0].save(tmp_path / "state.pt")
    resumed = run_experiment(spec, pretrained, resume_state=TrainingState.load(saved))
    assert resumed.metrics == first.metrics


def test_pretrained_save_load_and_reuse(synthetic_root, tmp_path):
    spec = tiny_spec(synthetic_root, tmp_path, "source_only")
    pretrained = pretrain_source(spec)
    path = pretrained.save(tmp_path / "model.pt")
    loaded = PretrainedSource.load(path)
    assert loaded.key == source_training(spec).key == pretrained.key
    assert loaded.classes == pretrained.classes
    # the typed parts of the result survive the file (written as the same JSON as before)
    assert (loaded.step_path, loaded.timings, loaded.config) == (pretrained.step_path, pretrained.timings,
                                                                 pretrained.config)
    assert loaded.step_path.path == "eager" and loaded.timings.steps > 0
    reports, states = [], []
    result = run_experiment(spec, loaded, on_epoch=lambda r, s: (reports.append(r), states.append(s())))
    assert len(reports) == 1 and "reused" in reports[0].logs[0]
    assert states == [None], "an evaluation-only epoch has no state to resume from"
    assert result.step_path == loaded.step_path and result.timings == loaded.timings
    assert source_training(spec.replace(method="timematch")).key == source_training(spec).key
    assert source_training(spec.replace(fold=1)).key != source_training(spec).key
    bad = tmp_path / "evil.pt"
    import pickle, os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DatasetError, match="not a readable source-model file"):
        PretrainedSource.load(bad)


@pytest.mark.slow
def test_no_confident_pseudo_label_epoch_is_logged(synthetic_root, tmp_path):
    spec = tiny_spec(synthetic_root, tmp_path, "fixmatch", method_config=dict(TINY, pseudo_threshold=1.0))
    reports = []
    result = run_experiment(spec, on_epoch=lambda r, s: reports.append(r))
    assert reports[0].metrics["pseudo_label_count"] == 0
    assert any("no target sample passed" in line for line in reports[0].logs)
    assert math.isfinite(result.metrics["test_macro_f1"])


@pytest.mark.slow
def test_sample_size_larger_than_target(synthetic_root, tmp_path):
    spec = tiny_spec(synthetic_root, tmp_path, "timematch", method_config=dict(TINY, sample_size=10_000))
    reports = []
    run_experiment(spec, on_epoch=lambda r, s: reports.append(r))
    assert any("uses all" in line for line in reports[0].logs)


def test_nan_loss_stops_with_epoch_and_step(synthetic_root, tmp_path, monkeypatch):
    import timematch.methods.source_only as so

    monkeypatch.setattr(so, "focal_loss", lambda logits, y, gamma: logits.sum() * float("nan"))
    spec = tiny_spec(synthetic_root, tmp_path, "source_only")
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1; nothing was saved"):
        pretrain_source(spec)


def test_too_few_source_classes(synthetic_root, tmp_path):
    spec = tiny_spec(synthetic_root, tmp_path, "source_only", data=DataConfig(min_parcels=100_000))
    with pytest.raises(DatasetError, match="only 0 class"):
        pretrain_source(spec)
