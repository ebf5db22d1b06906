"""The step engine's rules, checked on the CPU: a method's step reads nothing back to the host
when its shapes are static (what a CUDA graph captures), or, when it declares an
``eager_reason``, reads back only where that reason says and does read back (else the reason
is stale); weighting equals selecting, the epoch's sums and the first bad step are read once,
and the step path is reported. (The capture itself, and graph against eager, run in
tests/test_gpu.py.)"""

import copy
import math

import pytest
import torch

from tests.support.host_reads import forbid_host_reads
from tests.support.models import assert_near
from timematch.data.dataset import DataConfig, open_domains
from timematch.data.views import place_views
from timematch.errors import ConfigError, NonFiniteLoss
from timematch.experiment import ExperimentSpec, pretrain_source, run_experiment
from timematch.methods import build_config, config_fields, get_method, method_names
from timematch.methods.base import Method
from timematch.methods.pseudo_label import supervised_and_pseudo_loss
from timematch.models import build_model
from timematch.step_engine import EpochSums, StepContext
from timematch.training import INJECT_NAN_VARIABLE, Execution

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def domains(synthetic_root, tmp_path_factory):
    return open_domains(synthetic_root, "DK", "FR1", 0, DataConfig(min_parcels=10),
                        tmp_path_factory.mktemp("engine-cache"))


#: Where the step of each method that declares an ``eager_reason`` reads back to the host, as
#: its reason says: the functions of its class inside which a read is let through.
EAGER_READS = {
    # the cost matrix to POT's unbalanced Sinkhorn solver, and the plan back
    "jumbot": ("alignment_loss",),
    # POT's exact solver and the DTW paths' convergence test inside the block-coordinate
    # descent; the estimated source marginal that the solver takes
    "mad": ("align", "source_weights"),
    "cmad": ("align", "source_weights"),
}


def method_on_cpu(name, domains, static_shapes=True, method_class: type[Method] | None = None, **model_options):
    """Method ``name`` on the CPU with a small batch, built as ``method_class`` (default: the
    registered class; a subclass of it plants a fault)."""
    source, target = domains
    extra = {"sample_size": 1} if "sample_size" in config_fields(name) else {}
    config = build_config(name, {"batch_size": 16, **extra})
    torch.manual_seed(0)
    method = (method_class or get_method(name))(config, build_model(num_classes=len(source.classes), **model_options),
                                                source, target, CPU)
    method.views = place_views(source, target, CPU)
    method.static_shapes = static_shapes
    method.set_train_mode()
    return method


def check_step_reads(method: Method, reads_in: tuple[str, ...] = ()) -> None:
    """Run one static-shape step of ``method`` (sample, step, the epoch sums, backward, after
    step) and hold it to what its class declares; raises ``AssertionError`` where it fails.

    Without an ``eager_reason``: no host read anywhere in the step (what a CUDA graph
    captures). With one: host reads only inside the functions ``reads_in`` of its class (where
    the reason says it reads), and at least one (else the reason is stale). Either way the
    logs are tensors."""
    kind = type(method)
    if kind.eager_reason:
        assert reads_in, f"{kind.__name__} declares an eager_reason: name where its step reads back (EAGER_READS)"
    else:
        assert not reads_in, f"{kind.__name__} gives no eager_reason, yet reads are allowed in {reads_in}"
    context = StepContext(torch.zeros((), dtype=torch.int64), 10, 100)
    with forbid_host_reads(allowed_in=[getattr(kind, name) for name in reads_in]) as reads:
        batches = method.sample()
        loss, logs = method.training_step(batches, context)
        numbers = EpochSums(CPU).add(loss, logs, context.global_step)
        loss.backward()
        method.after_step(context)
    assert not numbers, f"{kind.__name__} logs Python numbers {numbers}: return tensors"
    assert all(isinstance(v, torch.Tensor) for v in logs.values())
    if kind.eager_reason:
        assert reads, f"{kind.__name__}'s step reads nothing back, so its eager_reason is stale: {kind.eager_reason!r}"


@pytest.mark.parametrize("name", method_names())
def test_a_static_step_reads_nothing_back_or_only_where_its_eager_reason_says(domains, name):
    check_step_reads(method_on_cpu(name, domains), EAGER_READS.get(name, ()))


def test_every_eager_method_says_where_it_reads():
    assert set(EAGER_READS) == {name for name in method_names() if get_method(name).eager_reason}


def test_a_planted_host_read_fails_the_check(domains):
    """The check above, checked: a read planted in a step fails it, in a method that
    declares no eager reason and in one that does (outside where its reason says); a reason
    on a step that reads nothing fails it too."""

    class DANNWithRead(get_method("dann")):
        def training_step(self, batches, context):
            loss, logs = super().training_step(batches, context)
            float(loss)
            return loss, logs

    class JUMBOTWithRead(get_method("jumbot")):
        def training_step(self, batches, context):
            loss, logs = super().training_step(batches, context)
            loss.item()
            return loss, logs

    class DANNWithStaleReason(get_method("dann")):
        eager_reason = "a reason no longer true"

    with pytest.raises(AssertionError, match=r"a host read inside the step: Tensor.__float__"):
        check_step_reads(method_on_cpu("dann", domains, method_class=DANNWithRead))
    with pytest.raises(AssertionError, match=r"a host read inside the step: Tensor.item"):
        check_step_reads(method_on_cpu("jumbot", domains, method_class=JUMBOTWithRead), EAGER_READS["jumbot"])
    with pytest.raises(AssertionError, match="eager_reason is stale"):
        check_step_reads(method_on_cpu("dann", domains, method_class=DANNWithStaleReason), ("training_step",))
    with pytest.raises(AssertionError, match="name where its step reads back"):
        check_step_reads(method_on_cpu("jumbot", domains))


@pytest.mark.parametrize("domain_specific_bn", [True, False])
def test_weighting_the_confident_samples_equals_selecting_them(domains, domain_specific_bn):
    no_dropout = {"dropout": 0.0, "attention_dropout": 0.0}
    method = method_on_cpu("fixmatch", domains, **no_dropout)
    batches = method.sample()
    source, target = batches["source"], batches["target_strong"]
    pseudo = torch.randint(0, len(domains[0].classes), (len(target),))
    results = {}
    for count in (0, 1, 7):
        confident = torch.zeros(len(target), dtype=torch.bool)
        confident[torch.randperm(len(target))[:count]] = True
        for static in (True, False):
            student = copy.deepcopy(method.model)
            loss, logs = supervised_and_pseudo_loss(student, source, target, pseudo, confident, 2.0, 1.0,
                                                    domain_specific_bn, static_shapes=static)
            loss.backward()
            results[count, static] = (loss.detach(), student)
        (loss_static, a), (loss_selected, b) = results[count, True], results[count, False]
        assert float(loss_static) == pytest.approx(float(loss_selected), rel=1e-5, abs=1e-6)
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=key)
        for (pname, p), q in zip(a.named_parameters(), b.parameters()):
            if q.grad.norm() > 1e-4:  # (zero in exact arithmetic otherwise: LTAE's key bias)
                assert_near(p.grad, q.grad, 1e-3, f"{count} confident: {pname}")


def test_epoch_sums_are_read_once_with_the_first_bad_step():
    sums = EpochSums(CPU)
    step = torch.zeros((), dtype=torch.int64)
    for value in (1.0, 2.0, float("inf"), float("nan")):
        assert not sums.add(torch.tensor(value), {"pseudo_label_count": torch.tensor(3.0)}, step)
        step.add_(1)
    values, first_bad, bad_loss = sums.read()
    assert first_bad == 2 and bad_loss == math.inf and values["pseudo_label_count"] == 12.0
    values, first_bad, _ = sums.read()  # read resets in place
    assert first_bad == -1 and values["pseudo_label_count"] == 0.0
    # a Python number is summed too, and named: a captured step would have frozen it
    assert sums.add(torch.tensor(1.0), {"coefficient": 0.5}, step) == ["coefficient"]
    assert sums.read()[0]["coefficient"] == 0.5


@pytest.mark.slow
def test_a_nan_loss_stops_the_trial_naming_the_epoch_and_step(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_VARIABLE, "dann:2:3")
    tiny = {"epochs": 3, "steps_per_epoch": 4, "batch_size": 16}
    spec = ExperimentSpec(data_root=synthetic_root, source="DK", target="FR1", method="dann", method_config=tiny,
                          pretrain_config={**tiny, "epochs": 1}, data=DataConfig(min_parcels=10), cache_dir=tmp_path)
    reports = []
    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 2, step 3; the last checkpoint holds epoch 1"):
        run_experiment(spec, pretrain_source(spec), on_epoch=lambda report, state: reports.append(report.epoch))
    assert reports == [1]


@pytest.mark.slow
def test_the_step_path_is_reported(synthetic_root, tmp_path):
    tiny = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16}
    spec = ExperimentSpec(data_root=synthetic_root, source="DK", target="FR1", method="mmd", method_config=tiny,
                          pretrain_config=tiny, data=DataConfig(min_parcels=10), cache_dir=tmp_path)
    result = run_experiment(spec, pretrain_source(spec))
    assert result.step_path.path == "eager" and "cpu" in result.step_path.reason
    assert result.step_path.precision == "fp32" and "host memory" in result.step_path.placement


def test_bad_execution_settings_are_config_errors():
    with pytest.raises(ConfigError, match="precision 'fp16'.*fp32, bf16"):
        Execution(precision="fp16")
    with pytest.raises(ConfigError, match="gpu_share"):
        Execution(gpu_share=0)
