"""Trial arrays (timematch/arrays.py): K trials of one method trained as one fused model.

A member is the trial it would be alone: the same seed and config give the same weights
after the same steps (every model and owned-module tensor within ``TOLERANCE`` of its
largest value) and the same logged epoch metrics, for every method that runs in arrays,
with the members' searched values differing. Alone here means on the step's static-shape
path (the GPU's, which an array always takes); the CPU's default path selects confident
samples instead, which is the same up to dropout draws (timematch/methods/pseudo_label.py).
A member that goes NaN or is stopped leaves without disturbing the others; a resumed
array continues its members as if never stopped; what cannot share an array says why.
"""

import math

import pytest
import torch

from tests.support.methods import tiny_config, tiny_source
from timematch.arrays import array_reason, fit_array, varying_keys
from timematch.errors import ConfigError, NonFiniteLoss
from timematch.experiment import build_trial
from timematch.methods import build_config, get_method, method_names
from timematch.training import fit

#: How far a member's weights may be from the same trial's alone, as a share of how far the
#: trial alone moved from its start (L2 over every model and owned-module tensor). Float32
#: rounding differs (vmap batches the matrix products), and Adam turns an element's rounding-level
#: gradient (a bias that a normalisation cancels) into a step of about lr in that rounding's
#: direction, so such elements move apart by up to their own movement. Measured on the tiny
#: budget below (2026-12-06, CPU): 7e-8 (MMD) to 4.3e-6 (FixMatch).
TOLERANCE = 1e-4
#: Logged epoch metrics (losses, accuracies, counts): relative difference.
METRIC_TOLERANCE = 1e-5

ARRAYED = [n for n in method_names() if array_reason(get_method(n)) is None and get_method(n).starts_from_source]
#: Per method, a member whose method-specific values differ from the defaults.
OWN_VALUES = {
    "dann": {"trade_off": 0.3}, "cdan": {"trade_off": 0.3}, "cdan_e": {"trade_off": 0.3}, "alda": {"trade_off": 0.3},
    "mmd": {"trade_off": 0.3}, "raincoat": {"sinkhorn_weight": 0.3, "reconstruction_weight": 2e-4},
    "fixmatch": {"pseudo_threshold": 0.3, "trade_off": 1.0, "ema_decay": 0.9},
    "timematch": {"pseudo_threshold": 0.3, "trade_off": 1.0, "ema_decay": 0.9},
}


@pytest.fixture(scope="module")
def base(synthetic_root, tmp_path_factory):
    return tiny_source(synthetic_root, tmp_path_factory.mktemp("array-cache"))


def _method(base, name, values):
    """The method of a trial, built as a trial builds it (timematch.experiment.build_trial)."""
    spec, pretrained = base
    trial = build_trial(spec.replace(method=name, method_config={**tiny_config(name), **values}), pretrained)
    return trial.method, trial.seed


def _alone(base, name, values):
    method, seed = _method(base, name, values)
    method.static_shapes = True
    start = {k: v.clone() for k, v in _tensors(method).items()}
    return method, fit(method, seed), start


def _tensors(method):
    found = {f"model.{k}": v for k, v in method.model.state_dict().items()}
    for owner, owned in method.owned.items():
        found.update({f"{owner}.{k}": v for k, v in owned.module.state_dict().items()})
    return found


def _assert_same_trial(member, alone):
    (m_array, r_array), (m_alone, r_alone, start) = member, alone
    mine, theirs = _tensors(m_array), _tensors(m_alone)
    for key, value in theirs.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(mine[key], value), key
    floats = [k for k, v in theirs.items() if v.dtype.is_floating_point]
    apart = torch.cat([(mine[k] - theirs[k]).flatten() for k in floats]).norm().item()
    moved = torch.cat([(theirs[k] - start[k]).flatten() for k in floats]).norm().item()
    assert moved > 0 and apart <= TOLERANCE * moved, (apart, moved)
    assert len(r_array.history) == len(r_alone.history)
    for mine, theirs in zip(r_array.history, r_alone.history):
        for key in ("train_loss", "target_val_f1", "pseudo_label_count", "estimated_shift", "discriminator_accuracy",
                    "transfer_loss", "source_loss", "target_loss"):
            if key in theirs.metrics:
                a, b = mine.metrics[key], theirs.metrics[key]
                assert math.isclose(a, b, rel_tol=METRIC_TOLERANCE, abs_tol=1e-7) or (math.isnan(a) and math.isnan(b)), \
                    (key, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ARRAYED)
def test_a_member_is_the_trial_alone(base, name):
    values = [{}, {"lr": 3e-4, "weight_decay": 1e-3}, OWN_VALUES.get(name, {"lr": 5e-5})]
    alone = [_alone(base, name, v) for v in values]
    built = [_method(base, name, v) for v in values]
    members = [m for m, _ in built]
    outcomes = fit_array(members, built[0][1])
    for member, outcome, single in zip(members, outcomes, alone):
        assert outcome.error is None, outcome.error
        _assert_same_trial((member, outcome.result), single)
    # the members trained with their own values: they differ from one another
    first, second = (_tensors(m)["model.decoder.0.weight" if "model.decoder.0.weight" in _tensors(m) else
                                 next(k for k in _tensors(m) if k.endswith("weight"))] for m in members[:2])
    assert not torch.allclose(first, second)


@pytest.mark.slow
def test_a_member_that_goes_nan_leaves_and_the_others_go_on(base):
    values = [{}, {"lr": 3e-4}, {"trade_off": 0.3}]
    alone = [_alone(base, "dann", v) for v in values]
    built = [_method(base, "dann", v) for v in values]
    members = [m for m, _ in built]
    # member 0's second step: the member whose modules the fused step runs leaves, the others go on
    outcomes = fit_array(members, built[0][1], poison=[1, -1, -1])
    assert isinstance(outcomes[0].error, NonFiniteLoss) and outcomes[0].left_at == 1
    assert "epoch 1, step 2" in str(outcomes[0].error)
    for k in (1, 2):
        assert outcomes[k].error is None
        _assert_same_trial((members[k], outcomes[k].result), alone[k])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timematch", "dann"])
def test_a_stopped_member_leaves_with_its_state_and_the_others_go_on(base, name):
    """Member 0 stopped after its first epoch's report: the fused step runs member 0's modules,
    which its evaluation left in eval mode; the other member still trains as alone."""
    values = [{}, {"lr": 3e-4}]
    alone = [_alone(base, name, v) for v in values]
    built = [_method(base, name, v) for v in values]
    members = [m for m, _ in built]
    seen = {0: [], 1: []}

    class Stop(Exception):
        pass

    def stopper(k):
        def on_epoch(report, state):
            seen[k].append(report.epoch)
            if k == 0 and report.epoch == 1:  # a scheduler stopping it at its first rung
                seen["weights"] = {key: v.clone() for key, v in _tensors(members[0]).items()}
                raise Stop("stopped at rung 1")
        return on_epoch

    outcomes = fit_array(members, built[0][1], on_epoch=[stopper(0), stopper(1)])
    assert isinstance(outcomes[0].error, Stop) and seen[0] == [1]
    assert outcomes[1].error is None and seen[1] == [1, 2]
    _assert_same_trial((members[1], outcomes[1].result), alone[1])
    # the stopped member kept its weights of epoch 1: the array's later steps did not touch them
    assert all(torch.equal(seen["weights"][k], v) for k, v in _tensors(members[0]).items())


@pytest.mark.slow
def test_a_resumed_array_continues_every_member(base):
    values = [{}, {"lr": 3e-4, "ema_decay": 0.9}]
    built = [_method(base, "timematch", v) for v in values]
    states = {}

    def keep(k):
        return lambda report, state: states.setdefault((k, report.epoch), state())

    full = fit_array([m for m, _ in built], built[0][1], on_epoch=[keep(0), keep(1)])
    resumed_members = [_method(base, "timematch", v)[0] for v in values]
    resumed = fit_array(resumed_members, built[0][1], resume_states=[states[(0, 1)], states[(1, 1)]])
    for k in range(2):
        assert [h.epoch for h in resumed[k].result.history] == [1, 2]
        for key, value in _tensors(built[k][0]).items():
            assert torch.equal(_tensors(resumed_members[k])[key], value), key
        assert resumed[k].result.history[-1].metrics["train_loss"] == full[k].result.history[-1].metrics["train_loss"]


def test_what_sets_a_shape_or_a_branch_is_equal_inside_an_array():
    from timematch.arrays import array_signature, invariant_keys

    for name in method_names():
        config_class = get_method(name).config_class
        keys = invariant_keys(config_class)
        assert {"epochs", "steps_per_epoch", "batch_size", "optimizer", "schedule"} <= set(keys)
        assert "lr" not in keys and "weight_decay" not in keys
    assert {"fourier_modes", "fourier_channels"} <= set(invariant_keys(get_method("raincoat").config_class))
    assert {"kernel_min_exponent", "kernel_max_exponent"} <= set(invariant_keys(get_method("mmd").config_class))
    assert "grl_max_iters" not in invariant_keys(get_method("dann").config_class)
    assert array_signature(build_config("raincoat", {"lr": 1e-3})) == array_signature(build_config("raincoat", {}))
    assert array_signature(build_config("raincoat", {"fourier_modes": 4})) != array_signature(build_config("raincoat", {}))


def test_what_cannot_share_an_array_says_why(base):
    with pytest.raises(ConfigError, match="batch_size differs"):
        varying_keys([build_config("dann", {"batch_size": 16}), build_config("dann", {"batch_size": 32})])
    with pytest.raises(ConfigError, match="domain_specific_bn differs"):
        varying_keys([build_config("timematch", {}), build_config("timematch", {"domain_specific_bn": False})])
    assert varying_keys([build_config("timematch", {}), build_config("timematch", {"lr": 1e-3, "max_temporal_shift": 30})]) \
        == ("lr", "max_temporal_shift")
    jumbot = [_method(base, "jumbot", {})[0] for _ in range(2)]
    with pytest.raises(ConfigError, match="JUMBOT trials run alone.*host"):
        fit_array(jumbot, 0)
    sizes = [_method(base, "dann", {"discriminator_hidden": h})[0] for h in (16, 32)]
    with pytest.raises(ConfigError, match="discriminator_hidden differs"):
        fit_array(sizes, 0)
