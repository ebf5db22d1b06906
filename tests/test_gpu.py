"""The CUDA path: the same model, shift estimation and methods on a GPU as on the CPU, and
the fast path (the training step captured once as a CUDA graph and replayed).

Skipped without a CUDA device. What these guard: the fused pixel encoder's GPU chunking
(one large chunk, a code path the CPU never takes), device placement of every tensor a
method builds (teacher, pseudo labels, shifted positions), that what a GPU trial writes
(checkpoints, source models) loads on a CPU-only machine with
``torch.load(weights_only=True)``, as a Ray trial resumed on another node does; and for
every registered method: the graph and the eager step give the same weights from the same
seed (or the method runs eagerly for its stated reason), a checkpoint of the fast path
resumes on either path, batches built on the GPU equal the CPU's for the same draws, and
bf16 and streamed tiles run on the fast path.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.support.methods import tiny_config
from tests.support.models import assert_fused_matches_plain, assert_near, make_batch, run
from timematch.checkpoint import TrainingState
from timematch.data.dataset import DataConfig, open_domains
from timematch.data.views import Batch, DomainViews
from timematch.experiment import ExperimentSpec, PretrainedSource, pretrain_source, run_experiment
from timematch.methods import get_method, method_names
from timematch.models import MODEL_NAMES, build_model
from timematch.shift import estimate_shift
from timematch.evaluation import pick_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
TINY = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 32}


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def test_default_device_is_cuda():
    assert pick_device() == CUDA


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_model_on_cuda_matches_cpu(name, train):
    torch.manual_seed(0)
    cpu = build_model(name, num_classes=5, with_geom=True).train(train)
    gpu = copy.deepcopy(cpu).to(CUDA)
    batch = make_batch(seed=3, batch=16, dates=20, pixels=32)
    torch.manual_seed(1)
    expected, _ = run(cpu, batch)
    torch.manual_seed(1)
    got, _ = run(gpu, to(batch, CUDA))
    assert torch.isfinite(got).all()
    if not train:  # eval mode is deterministic (dropout masks differ between devices)
        assert_near(got, expected, 1e-3, name)
        return  # no backward in eval mode: nothing trains there (and cuDNN's GRU refuses it)
    got.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters() if p.requires_grad)


@pytest.mark.parametrize("train", [True, False])
def test_fused_pixel_encoder_on_cuda_matches_plain_modules(train):
    torch.manual_seed(0)
    fused = build_model(num_classes=4, with_geom=True).spatial_encoder.to(CUDA).train()
    for seed in (7, 8):
        batch = to(make_batch(seed=seed, batch=32, dates=30, pixels=64), CUDA)
        fused(batch["pixels"], batch["mask"], batch["geom"])
    fused.train(train)
    batch = to(make_batch(batch=32, dates=30, pixels=64), CUDA)
    assert_fused_matches_plain(fused, batch, output_tol=1e-4, grad_tol=1e-3)


def test_shift_estimation_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_model(num_classes=6).eval()
    batches = []
    for s in range(3):
        b = make_batch(seed=s, batch=24, dates=25, pixels=16)
        b["positions"] = torch.sort(torch.randint(0, 300, b["positions"].shape), dim=1).values
        batches.append(Batch(**b, label=torch.full((24,), -1), index=torch.arange(24)))
    shifts = range(-60, 61)
    cpu = estimate_shift(model, batches, shifts, "is")
    gpu = estimate_shift(model.to(CUDA), [b.to(CUDA) for b in batches], shifts, "is")
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=1e-3, atol=1e-4)
    assert gpu.estimate == cpu.estimate


@pytest.mark.parametrize("method", ["timematch", "fixmatch", "upper_bound"])
def test_method_trains_on_cuda_and_its_files_load_on_cpu(synthetic_root, tmp_path, method):
    config = dict(TINY, sample_size=2) if method == "timematch" else dict(TINY)
    spec = ExperimentSpec(data_root=synthetic_root, source="DK", target="FR1", method=method, method_config=config,
                          pretrain_config=dict(TINY), data=DataConfig(min_parcels=10), cache_dir=tmp_path,
                          device="cuda")
    pretrained = pretrain_source(spec)
    assert all(v.device.type == "cpu" for v in pretrained.state_dict.values())
    loaded = PretrainedSource.load(pretrained.save(tmp_path / "source.pt"))
    states = []
    result = run_experiment(spec, loaded, on_epoch=lambda report, state: states.append(state()))
    assert all(p.device.type == "cpu" for p in result.model.parameters())  # ready to log
    assert 0.0 <= result.metrics["test_macro_f1"] <= 1.0
    if method == "timematch":
        assert -60 <= result.metrics["estimated_shift"] <= 60
    # the epoch-1 checkpoint of the GPU run: plain CPU tensors, and it resumes on the CPU
    saved = tmp_path / "state.pt"
    state = TrainingState.load(states[0].save(saved))
    resumed = run_experiment(spec.replace(device="cpu"), loaded, resume_state=state)
    assert len(resumed.history) == TINY["epochs"]
    np.testing.assert_equal(resumed.history[0].metrics, result.history[0].metrics)  # NaN-aware


# -- the fast path ------------------------------------------------------------------------

FAST = {"epochs": 2, "steps_per_epoch": 6, "batch_size": 32}  # capture in epoch 1, replays across epochs


def fast_config(name: str) -> dict:
    return tiny_config(name, FAST)


@pytest.fixture(scope="module")
def cuda_base(synthetic_root, tmp_path_factory):
    spec = ExperimentSpec(data_root=synthetic_root, source="DK", target="FR1", method="source_only",
                          pretrain_config=dict(TINY), data=DataConfig(min_parcels=10),
                          cache_dir=tmp_path_factory.mktemp("fast-cache"), device="cuda")
    return spec, pretrain_source(spec)


def _run(spec, pretrained, resume=None):
    states = []
    result = run_experiment(spec, pretrained, on_epoch=lambda report, state: states.append(state()),
                            resume_state=resume)
    return result, states


def assert_same_weights(a: dict, b: dict, tol: float, what: str) -> None:
    for key, value in a.items():
        if value.is_floating_point():
            assert_near(b[key], value, tol, f"{what}: {key}")
        else:
            assert torch.equal(b[key].cpu(), value.cpu()), f"{what}: {key}"


@pytest.mark.parametrize("name", method_names())
def test_graph_and_eager_steps_give_the_same_weights(cuda_base, name):
    spec, pretrained = cuda_base
    spec = spec.replace(method=name, method_config={**fast_config(name), "weight_decay": 2e-4})
    graph, graph_states = _run(spec, pretrained)
    eager, _ = _run(spec.replace(cuda_graph=False), pretrained)
    reason = get_method(name).eager_reason
    if reason:
        assert graph.step_path.path == "eager" and reason in graph.step_path.reason
    else:
        assert graph.step_path.path == "cuda_graph", graph.step_path
    assert eager.step_path.path == "eager"
    assert_same_weights(eager.model.state_dict(), graph.model.state_dict(), 1e-4, name)
    assert graph.history[-1].metrics["train_loss"] == pytest.approx(eager.history[-1].metrics["train_loss"], rel=1e-3)


@pytest.mark.parametrize("name", ["timematch", "dann", "upper_bound"])
def test_a_fast_path_checkpoint_resumes_on_either_path(cuda_base, name, tmp_path):
    spec, pretrained = cuda_base
    spec = spec.replace(method=name, method_config=fast_config(name))
    straight, states = _run(spec, pretrained)
    saved = tmp_path / "epoch1.pt"
    checkpoint = TrainingState.load(states[0].save(saved))
    for path in (True, False):
        resumed, _ = _run(spec.replace(cuda_graph=path), pretrained, resume=checkpoint)
        assert len(resumed.history) == FAST["epochs"]
        assert_same_weights(straight.model.state_dict(), resumed.model.state_dict(), 1e-4, f"cuda_graph={path}")


def test_a_cpu_checkpoint_resumes_on_the_fast_path(cuda_base, tmp_path):
    spec, pretrained = cuda_base
    spec = spec.replace(method="timematch", method_config=fast_config("timematch"))
    _, states = _run(spec.replace(device="cpu"), pretrained)
    resumed, _ = _run(spec, pretrained, resume=states[0])
    assert resumed.step_path.path == "cuda_graph"
    assert all(torch.isfinite(v).all() for v in resumed.model.state_dict().values() if v.is_floating_point())


def test_streamed_tiles_and_bf16_run_on_the_fast_path(cuda_base):
    spec, pretrained = cuda_base
    spec = spec.replace(method="timematch", method_config=fast_config("timematch"))
    streamed, _ = _run(spec.replace(gpu_share=1e-6), pretrained)  # the tiles do not fit: host memory
    assert streamed.step_path.path == "cuda_graph" and "streamed" in streamed.step_path.placement
    eager, _ = _run(spec.replace(gpu_share=1e-6, cuda_graph=False), pretrained)
    assert_same_weights(eager.model.state_dict(), streamed.model.state_dict(), 1e-4, "streamed")
    half, _ = _run(spec.replace(precision="bf16"), pretrained)
    assert (half.step_path.path, half.step_path.precision) == ("cuda_graph", "bf16")
    assert all(torch.isfinite(v).all() for v in half.model.state_dict().values() if v.is_floating_point())
    assert 0.0 <= half.metrics["test_macro_f1"] <= 1.0


@pytest.mark.parametrize("name", ["timematch", "alda"])
def test_eager_cuda_steps_never_synchronise(cuda_base, name):
    """The eager path on a GPU too reads nothing back inside an epoch: CUDA's sync debug mode
    raises at the first synchronising call of the training steps."""
    from timematch import step_engine

    spec, pretrained = cuda_base
    original = step_engine.StepEngine.run_epoch

    def strict(self, steps):
        for _ in range(steps):  # the steps, under the debug mode; the epoch's one read after it
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._one(None)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return self.sums.read()

    step_engine.StepEngine.run_epoch = strict
    try:
        result, _ = _run(spec.replace(method=name, method_config=fast_config(name), cuda_graph=False), pretrained)
    finally:
        step_engine.StepEngine.run_epoch = original
    assert len(result.history) == FAST["epochs"]


def test_views_on_the_gpu_build_the_cpu_content(synthetic_root, tmp_path):
    source, _ = open_domains(synthetic_root, "DK", "FR1", 0, DataConfig(min_parcels=10), tmp_path)
    cpu = DomainViews.on(source, "cpu", torch.Generator().manual_seed(0))
    gpu = DomainViews.on(source, CUDA)
    parcels = cpu.draw_labelled(64)
    pixel_index, mask = cpu.sample_pixels(parcels)
    dates = cpu.sample_dates(64)
    want = cpu.gather(parcels, pixel_index, mask, dates)
    got = gpu.gather(parcels.to(CUDA), pixel_index.to(CUDA), mask.to(CUDA), dates.to(CUDA))
    for key, value in want.tensors().items():
        assert torch.equal(getattr(got, key).cpu(), value), key
    strong = gpu.strong(gpu.draw_labelled(64), 30, 0.5)
    assert strong.pixels.is_cuda and strong.pixels.shape == want.pixels.shape and torch.isfinite(strong.pixels).all()


@pytest.mark.parametrize("name", ["timematch", "dann"])
def test_an_array_on_the_fast_path_equals_its_members_alone(cuda_base, name):
    """Trial arrays (timematch/arrays.py) on a GPU: the members' fused step captured as one CUDA
    graph, and each member's weights and losses those of its trial alone on the fast path."""
    from timematch.arrays import fit_array
    from timematch.experiment import build_trial

    spec, pretrained = cuda_base
    values = [{}, {"lr": 3e-4}, {"weight_decay": 1e-3}]
    specs = [spec.replace(method=name, method_config={**fast_config(name), **v}) for v in values]
    alone = [_run(s, pretrained)[0] for s in specs]
    trials = [build_trial(s, pretrained) for s in specs]
    outcomes = fit_array([t.method for t in trials], trials[0].seed)
    for trial, outcome, single in zip(trials, outcomes, alone):
        assert outcome.error is None, outcome.error
        assert outcome.result.step_path.path == "cuda_graph", outcome.result.step_path
        assert_same_weights(single.model.state_dict(), trial.method.eval_model().state_dict(), 1e-3, name)
        assert outcome.result.history[-1].metrics["train_loss"] == pytest.approx(
            single.history[-1].metrics["train_loss"], rel=1e-3)


def test_tiles_go_to_host_memory_when_their_trials_share_of_the_gpu_is_too_small(synthetic_root):
    from timematch.data.views import TILE_MEMORY_SHARE, TileTensors, place_views

    source, target = open_domains(synthetic_root, "DK", "FR1", 0, DataConfig(min_parcels=10))
    device = torch.device("cuda")
    need = TileTensors.nbytes(source.packed) + TileTensors.nbytes(target.packed)
    total = torch.cuda.get_device_properties(0).total_memory
    alone = place_views(source, target, device, 1.0)
    assert alone.inline and alone.source.tile.pixels.device.type == "cuda"
    crowded = need / (TILE_MEMORY_SHARE * total) * 0.5  # trials so many that each share holds half the tiles
    shared = place_views(source, target, device, crowded)
    assert not shared.inline and shared.source.tile.pixels.device.type == "cpu"
    assert "more than the trial's" in shared.placement
