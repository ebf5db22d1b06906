"""The CUDA path: the same model, shift estimation and methods on a GPU as on the CPU.

Skipped without a CUDA device. What these guard: the fused pixel encoder's GPU chunking
(one large chunk, a code path the CPU never takes), device placement of every tensor a
method builds (teacher, pseudo labels, shifted positions), and that what a GPU trial
writes (checkpoints, source models) loads on a CPU-only machine with
``torch.load(weights_only=True)``, as a Ray trial resumed on another node does.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.test_models import assert_fused_matches_plain, assert_near, make_batch, run
from timematch.data.dataset import DataConfig
from timematch.experiment import ExperimentSpec, PretrainedSource, pretrain_source, run_experiment
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
    batches = [make_batch(seed=s, batch=24, dates=25, pixels=16) for s in range(3)]
    for b in batches:
        b["positions"] = torch.sort(torch.randint(0, 300, b["positions"].shape), dim=1).values
    shifts = range(-60, 61)
    cpu = estimate_shift(model, batches, shifts, "is")
    gpu = estimate_shift(model.to(CUDA), [to(b, CUDA) for b in batches], shifts, "is")
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
    torch.save(states[0], saved)
    state = torch.load(saved, map_location="cpu", weights_only=True)
    resumed = run_experiment(spec.replace(device="cpu"), loaded, resume_state=state)
    assert len(resumed.history) == TINY["epochs"]
    np.testing.assert_equal(resumed.history[0].metrics, result.history[0].metrics)  # NaN-aware
