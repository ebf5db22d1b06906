"""Self-contained models: a :class:`ParcelPredictor` saved to plain files, and the pyfunc
classifier logged to MLflow, predict raw parcels read with the dataset's own reader exactly as
:func:`timematch.evaluation.predict` predicts them through the packed cache; the torch module
still loads with ``mlflow.pytorch.load_model``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from timematch.data.dataset import DataConfig, open_domains
from timematch.evaluation import model_inputs, predict
from timematch.models import build_model
from timematch.serving import ParcelInputError, ParcelPredictor, check_input, example_input, parcels_input

CONFIG = DataConfig(min_parcels=20)


@pytest.fixture(scope="module")
def domains(data_root, tmp_path_factory):
    return open_domains(data_root, "DK", "FR1", 0, CONFIG, cache_dir=tmp_path_factory.mktemp("cache"))


def random_model(domain, seed: int = 0, **options) -> torch.nn.Module:
    """An untrained classifier whose BatchNorm statistics are fitted to some of ``domain``'s
    parcels, so that its predictions differ between parcels (default statistics give one class)."""
    torch.manual_seed(seed)
    model = build_model("pse_ltae", num_classes=len(domain.classes), **options).train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # the plain average of the batches below
    with torch.no_grad():
        for batch in domain.eval_batches(domain.split.train[:24]):
            args, kwargs = model_inputs(model, batch, torch.device("cpu"))
            model(*args, **kwargs)
    return model.eval()


@pytest.fixture(scope="module")
def model(domains):
    return random_model(domains[1])


@pytest.mark.parametrize("options, shift", [({}, 0), ({"with_geom": True}, 7)], ids=["plain", "geom-shift"])
def test_saved_predictor_matches_evaluation(domains, model, data_root, tmp_path, options, shift):
    _, target = domains
    model = random_model(target, **options) if options else model
    saved = ParcelPredictor(model, target.classes, target.normalizer, shift=shift, model_options=options)
    predictor = ParcelPredictor.load(saved.save(tmp_path / "predictor"), device="cpu")
    parcels = target.split.test

    names, probs = predictor.predict(parcels_input(data_root, "FR1", parcels))
    expected, _ = predict(model, target, parcels, torch.device("cpu"), shift=shift)

    assert probs.shape == (len(parcels), len(target.classes))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert names == [target.classes[k] for k in expected.argmax(1)]
    assert len(set(names)) > 1  # the check is not trivially about one class


def test_a_method_extension_is_saved_and_rebuilt(domains, data_root, tmp_path):
    """RAINCOAT's frequency branch, attached to the classifier by the method, comes back with a
    saved predictor (settings record it; the method attaches it again): the same predictions."""
    from timematch.methods import build_config, get_method

    _, target = domains
    model = random_model(target, seed=1)
    get_method("raincoat").extend_model(model, build_config("raincoat", {"fourier_modes": 4}))
    with torch.no_grad():  # as if it had learned: the branch starts at zero
        model.extensions["raincoat"].out.weight.normal_(std=0.1)
    predictor = ParcelPredictor.load(ParcelPredictor(model, target.classes, target.normalizer).save(tmp_path / "rc"),
                                     device="cpu")
    assert predictor.settings()["architecture"]["extensions"] == {
        "raincoat": {"fourier_modes": 4, "fourier_channels": 16}}
    parcels = target.split.test
    expected, _ = predict(model, target, parcels, torch.device("cpu"))
    np.testing.assert_allclose(predictor.predict_proba(parcels_input(data_root, "FR1", parcels)), expected, atol=1e-5)


def test_small_pixel_budget_splits_batches_without_changing_results(domains, model, data_root):
    _, target = domains
    predictor = ParcelPredictor(model, target.classes, target.normalizer)
    batch = parcels_input(data_root, "FR1", target.split.val)
    whole = predictor.predict_proba(batch)
    predictor.pixel_budget = 100
    np.testing.assert_allclose(predictor.predict_proba(batch), whole, atol=1e-5)


def test_bad_input_says_which_key(domains, model, data_root):
    _, target = domains
    batch = example_input(data_root, "FR1")
    with pytest.raises(ParcelInputError, match="uint16"):
        check_input({**batch, "pixels": batch["pixels"].astype(np.int64)})
    with pytest.raises(ParcelInputError, match="dates must have shape"):
        check_input({**batch, "dates": batch["dates"][:, 1:]})
    with pytest.raises(ParcelInputError, match="lacks key"):
        check_input({k: v for k, v in batch.items() if k != "start_date"})
    with pytest.raises(ParcelInputError, match="yyyymmdd"):
        ParcelPredictor(model, target.classes, target.normalizer).predict(
            {**batch, "start_date": np.ones_like(batch["start_date"])})
    # dates the model cannot encode: refused here, on the host (the forward does not check)
    with pytest.raises(ParcelInputError, match=r"dates .*\[-100, 465\)"):
        ParcelPredictor(model, target.classes, target.normalizer).predict(
            {**batch, "start_date": np.full_like(batch["start_date"], 20150101)})


@pytest.fixture
def tracking(tmp_path):
    """A SQLite store and an experiment whose artifacts stay in ``tmp_path``; the global tracking
    URI is put back afterwards."""
    import mlflow
    from mlflow import MlflowClient

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
    yield uri, client, experiment
    mlflow.set_tracking_uri(previous)


def test_logged_classifier_predicts_raw_parcels_alone(domains, model, data_root, tracking):
    import mlflow

    from timematch.runner.serving import CLASSIFIER_NAME, MODULE_NAME, log_parcel_model
    from timematch.runner.runs import PIP_REQUIREMENTS

    uri, client, experiment = tracking
    _, target = domains
    predictor = ParcelPredictor(model, target.classes, target.normalizer, info={"source": "DK", "target": "FR1"})
    run_id = client.create_run(experiment).info.run_id

    uris = log_parcel_model(uri, run_id, predictor, example_input(data_root, "FR1"), pip_requirements=PIP_REQUIREMENTS)

    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and mlflow.active_run() is None  # left to its owner to end
    assert mlflow.get_tracking_uri() != uri  # and MLflow's global URI as it was
    assert run.data.tags["classifier_uri"] == uris["classifier"] and run.data.tags["model_uri"] == uris["module"]
    mlflow.set_tracking_uri(uri)
    names = {m.name for m in mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")}
    assert names == {CLASSIFIER_NAME, MODULE_NAME}

    loaded = mlflow.pyfunc.load_model(uris["classifier"])
    signature = loaded.metadata.signature
    assert signature is not None and signature.inputs.input_names() == [
        "pixels", "n_pixels", "dates", "start_date", "geometric_features"]
    assert signature.outputs.input_names() == ["class", *(f"p_{c}" for c in target.classes)]
    assert loaded.metadata.metadata["classes"] == target.classes
    assert len(loaded.predict(loaded.input_example)) == 2  # the stored example: real parcels
    stored = Path(mlflow.artifacts.download_artifacts(uris["classifier"]))
    assert not [p.name for p in stored.rglob("*.pkl")]  # weights and settings only: nothing to unpickle

    parcels = target.split.test
    frame = loaded.predict(parcels_input(data_root, "FR1", parcels))
    expected, _ = predict(model, target, parcels, torch.device("cpu"))
    assert list(frame.columns) == ["class", *(f"p_{c}" for c in target.classes)]
    np.testing.assert_allclose(frame[[f"p_{c}" for c in target.classes]].to_numpy(), expected, atol=1e-5)
    assert frame["class"].tolist() == [target.classes[k] for k in expected.argmax(1)]

    module = mlflow.pytorch.load_model(uris["module"])
    assert isinstance(module, torch.nn.Module)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in model.state_dict().items())
    assert mlflow.models.get_model_info(uris["module"]).signature is not None
