"""The method contract, tested for every registered method the moment it registers.

For each name in the registry (not a hand-kept list): a few steps end to end on CPU; an
epoch checkpoint, saved and loaded with ``weights_only=True``, restored into a fresh run
gives bit-identical weights (model and every owned module) and metrics after the next
epoch; the exported model loads with ``weights_only=True`` on the CPU and predicts the
same. Plus the contract's own parts: the step context, owned modules' modes, parameter
groups, the optimiser and schedule chosen by config, and manual optimisation.
"""

import math

import numpy as np
import pytest
import torch

from tests.support.methods import TINY, tiny_config, tiny_source
from timematch.checkpoint import TrainingState
from timematch.data.dataset import open_domains
from timematch.data.views import model_outputs
from timematch.evaluation import predict
from timematch.experiment import pretrain_source, run_experiment
from timematch.methods import build_config, get_method, method_names, source_model_method
from timematch.methods.base import Method, TrainConfig
from timematch.models import build_model
from timematch.serving import rebuild_model
from timematch.step_engine import LearningRate, StepContext, build_optimizer
from timematch.training import fit

METHODS = method_names()


@pytest.fixture(scope="module")
def base(synthetic_root, tmp_path_factory):
    return tiny_source(synthetic_root, tmp_path_factory.mktemp("contract-cache"))


def test_every_method_is_tested_and_one_is_the_source_model():
    assert len(METHODS) >= 11
    assert source_model_method().name == "source_only"


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_runs_end_to_end(base, name):
    spec, pretrained = base
    reports = []
    result = run_experiment(spec.replace(method=name, method_config=tiny_config(name)), pretrained,
                            on_epoch=lambda report, state: reports.append(report))
    assert 0.0 <= result.metrics["test_macro_f1"] <= 1.0
    assert {"test_accuracy", "test_kappa", "target_val_f1", "source_val_f1"} <= set(result.metrics)
    assert result.confusion.shape == (len(result.classes),) * 2
    assert reports, "no epoch reported"
    for report in reports:
        nan_allowed = {"pseudo_label_f1"}  # undefined in an epoch without confident samples
        bad = {k: v for k, v in report.metrics.items() if not math.isfinite(v) and k not in nan_allowed}
        assert not bad, f"non-finite epoch metrics: {bad}"


@pytest.mark.slow
def test_a_training_on_the_source_alone_does_not_depend_on_the_target(base):
    """Why the runner trains shift augmentation once per source tile: trained inside a
    scenario's trial (its epochs evaluated on that target) or once without a target and then
    evaluated, the weights, the source history and the target numbers are the same."""
    spec, _ = base
    spec = spec.replace(method="shift_aug", method_config=tiny_config("shift_aug"))
    shared = pretrain_source(spec)  # no target: as stage 1 trains it
    for target in ("FR1", "DK"):  # the test data has two tiles
        scenario = spec.replace(target=target)
        inside = run_experiment(scenario)  # trained in the trial, with per-epoch target metrics
        reused = run_experiment(scenario, shared)
        assert reused.history[0].logs == [f"reused the training {shared.key} on the source tile"]
        for key, value in inside.model.state_dict().items():
            assert torch.equal(value, reused.model.state_dict()[key]), key
        assert inside.metrics == pytest.approx(reused.metrics, rel=0, abs=1e-12)
        assert [h.metrics["source_val_f1"] for h in inside.history] == [
            h.metrics["source_val_f1"] for h in shared.history]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).trains_on == "both"])
def test_an_adaptation_method_reads_no_target_label(base, name, monkeypatch):
    """Unsupervised adaptation: with the target's labels moved to other classes in its training
    views, the weights come out the same (to 1e-5: two runs of a method with a wide
    discriminator differ by about 4e-7 on this CPU; a label read by a loss moves them by far
    more)."""
    from timematch.data.tiles import resolve_tile
    from timematch.data.views import DomainViews

    spec, pretrained = base
    target_tile = resolve_tile(spec.target)
    spec = spec.replace(method=name, method_config=tiny_config(name))
    straight = run_experiment(spec, pretrained)
    original = DomainViews.__init__

    def scrambled(self, domain, tile, generator=None):
        original(self, domain, tile, generator)
        if domain.tile == target_tile:
            # every label moved to the next class (no random draw: the global generator drives dropout)
            self.labels = torch.where(self.labels >= 0, (self.labels + 1) % len(domain.classes), self.labels)

    monkeypatch.setattr(DomainViews, "__init__", scrambled)
    blind = run_experiment(spec, pretrained)
    for key, value in straight.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, blind.model.state_dict()[key], rtol=0, atol=1e-5), \
                f"{name}: {key} depends on the target labels"


def _states(name, spec, pretrained, resume_state=None):
    states = []
    result = run_experiment(spec, pretrained, on_epoch=lambda report, state: states.append((report, state())),
                            resume_state=resume_state)
    return result, states


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_resumes_bit_identical_and_loads_safely(base, name, tmp_path):
    spec, pretrained = base
    # a config of its own, so the source-model method trains here instead of reusing `pretrained`
    spec = spec.replace(method=name, method_config={**tiny_config(name), "weight_decay": 2e-4})
    straight, states = _states(name, spec, pretrained)
    assert len(states) == 2
    path = tmp_path / "epoch1.pt"
    states[0][1].save(path)
    checkpoint = TrainingState.load(path)  # torch.load(weights_only=True): nothing unpickled
    resumed, resumed_states = _states(name, spec, pretrained, resume_state=checkpoint)
    assert [r.epoch for r, _ in resumed_states] == [2]
    (report_a, last_a), (report_b, last_b) = states[-1], resumed_states[-1]
    timing = {"samples_per_second", "data_wait_fraction"}
    assert {k: v for k, v in report_a.metrics.items() if k not in timing} == pytest.approx(
        {k: v for k, v in report_b.metrics.items() if k not in timing}, nan_ok=True, rel=0, abs=0)
    for key, value in last_a.model.items():
        assert torch.equal(value, last_b.model[key]), f"model {key}"
    assert set(last_a.modules) == set(last_b.modules)
    for module, state in last_a.modules.items():
        for key, value in state.items():
            assert torch.equal(value, last_b.modules[module][key]), f"{module}.{key}"
    assert straight.metrics == resumed.metrics
    # the exported model: weights only, on the CPU, the same predictions (rebuilt as a saved
    # predictor is: the classifier, then the extensions its method attached)
    exported = tmp_path / "model.pt"
    torch.save(straight.model.state_dict(), exported)
    model = rebuild_model(spec.model, len(straight.classes), straight.model.build_options,
                          straight.model.extension_options)
    model.load_state_dict(torch.load(exported, map_location="cpu", weights_only=True))
    source, target = open_domains(spec.data_root, spec.source, spec.target, spec.fold, spec.data, spec.cache_dir)
    if pretrained is not None and get_method(name).starts_from_source:
        from timematch.data.dataset import Normalizer

        target.normalizer = Normalizer.from_dict(pretrained.normalizer)
    parcels = target.split.test[:20]
    device = torch.device("cpu")
    expected = predict(straight.model, target, parcels, device)[0]
    np.testing.assert_allclose(predict(model, target, parcels, device)[0], expected, atol=1e-6)


# -- the contract's parts ----------------------------------------------------------------


def test_step_context_reads_the_step_from_a_tensor():
    step = torch.tensor(11)
    context = StepContext(step, steps_per_epoch=5, total_steps=50)
    assert float(context.progress) == pytest.approx(11 / 50)
    step.add_(1)  # what the engine does after each step: a captured step sees the new value
    assert float(context.progress) == pytest.approx(12 / 50)


def test_optimizer_and_schedule_follow_the_config():
    model = build_model(num_classes=3)
    groups = [{"name": "backbone", "params": list(model.spatial_encoder.parameters()), "lr_scale": 0.1},
              {"name": "head", "params": list(model.decoder.parameters()), "lr_scale": 1.0}]
    sgd = build_config("dann")
    optimizer = build_optimizer(sgd, groups, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    rate = LearningRate.of(sgd, total_steps=100)
    decay = (1 + 0.001 * 10) ** -0.75
    assert float(rate.factor(torch.tensor(10))) == pytest.approx(decay)
    cosine = LearningRate.of(build_config("timematch"), total_steps=10)
    assert [float(cosine.factor(torch.tensor(i))) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert float(LearningRate("constant", 10, 0.0, 0.0).factor(torch.tensor(7))) == 1.0
    adam = build_optimizer(build_config("timematch"), groups, torch.device("cpu"))
    assert isinstance(adam, torch.optim.Adam) and [g["base_lr"] for g in adam.param_groups] == pytest.approx([1e-5, 1e-4])


@pytest.mark.slow
def test_learning_rate_follows_the_schedule_in_training(base):
    spec, pretrained = base
    reports = []
    run_experiment(spec.replace(method="dann", method_config={**TINY, "epochs": 2}), pretrained,
                   on_epoch=lambda report, state: reports.append(report))
    # the head's rate after each epoch: lr (1 + 0.001 i)^-0.75 at the next step i
    expected = [1e-3 * (1 + 0.001 * i) ** -0.75 for i in (2, 4)]
    assert [r.metrics["lr"] for r in reports] == pytest.approx(expected)


def test_default_parameter_groups_scale_the_backbone(base):
    spec, pretrained = base
    source, target = open_domains(spec.data_root, "DK", "FR1", 0, spec.data, spec.cache_dir)
    model = build_model(num_classes=len(source.classes))
    method = get_method("dann")(build_config("dann"), model, source, target, torch.device("cpu"))
    groups = {g["name"]: g for g in method.parameter_groups()}
    assert groups["backbone"]["lr_scale"] == 0.1 and groups["head"]["lr_scale"] == 1.0
    head = {id(p) for p in groups["head"]["params"]}
    assert {id(p) for p in method.discriminator.parameters()} <= head
    assert {id(p) for p in model.decoder.parameters()} <= head
    assert not head & {id(p) for p in groups["backbone"]["params"]}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters())) + len(list(method.discriminator.parameters()))


def test_owned_modules_get_their_modes(base):
    spec, _ = base
    source, target = open_domains(spec.data_root, "DK", "FR1", 0, spec.data, spec.cache_dir)
    method = get_method("timematch")(build_config("timematch"), build_model(num_classes=len(source.classes)),
                                     source, target, torch.device("cpu"))
    method.set_train_mode()
    assert method.model.training and not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    with pytest.raises(ValueError, match="owns a module named 'teacher' already"):
        method.own("teacher", torch.nn.Linear(1, 1))


class AlternatingCritic(Method):
    """Two optimisers per step (a critic, then the model against it): manual optimisation."""

    manual_optimization = True

    def __init__(self, config, model, source, target, device):
        super().__init__(config, model, source, target, device)
        self.critic = self.own("critic", torch.nn.Linear(model.feature_dim, 1))

    def optimizer_groups(self):
        return {"model": [{"name": "model", "params": list(self.model.parameters())}],
                "critic": [{"name": "critic", "params": list(self.critic.parameters())}]}

    def sample(self):
        views = self.views.source
        return {"source": views.strong(views.draw_labelled(self.config.batch_size, balanced=False))}

    def training_step(self, batch, context):
        x = batch["source"]
        logits, features = model_outputs(self.model, x)
        critic_loss = self.critic(features.detach()).pow(2).mean()
        self.step_optimizer("critic", critic_loss, context)
        loss = torch.nn.functional.cross_entropy(logits, x.label) - 0.01 * self.critic(features).mean()
        self.step_optimizer("model", loss, context)
        return loss.detach(), {"critic_loss": critic_loss.detach()}


@pytest.mark.slow
def test_manual_optimization_with_two_optimizers_resumes(base):
    spec, _ = base
    source, target = open_domains(spec.data_root, "DK", "FR1", 0, spec.data, spec.cache_dir)
    config = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=8, lr=1e-3)

    def run(resume=None):
        torch.manual_seed(0)
        method = AlternatingCritic(config, build_model(num_classes=len(source.classes)), source, target,
                                   torch.device("cpu"))
        states = []
        fit(method, seed=0, on_epoch=lambda r, s: states.append(s()), resume_state=resume)
        return method, states

    method, states = run()
    assert set(states[0].optimizers) == {"model", "critic"} and set(states[0].modules) == {"critic"}
    assert all(s["state"] for s in states[-1].optimizers.values()), "both optimisers stepped"
    resumed, _ = run(resume=states[0])
    for a, b in zip(method.critic.state_dict().values(), resumed.critic.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(method.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_several_optimizers_need_manual_optimization(base):
    spec, _ = base
    source, target = open_domains(spec.data_root, "DK", "FR1", 0, spec.data, spec.cache_dir)

    class Forgot(AlternatingCritic):
        manual_optimization = False

    method = Forgot(TrainConfig(epochs=1, steps_per_epoch=1, batch_size=8), build_model(num_classes=len(source.classes)),
                    source, target, torch.device("cpu"))
    with pytest.raises(TypeError, match="set manual_optimization"):
        fit(method, seed=0)
