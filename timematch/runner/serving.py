"""Logged models that stand on their own: a pyfunc parcel classifier and the torch module.

:func:`log_parcel_model` writes two models into a run:

- ``parcel_classifier`` (pyfunc): ``mlflow.pyfunc.load_model(uri).predict(batch)`` takes a
  batch of raw parcels in the published format (the dict of arrays described in
  :mod:`timematch.serving`: ``pixels`` uint16 (B, T, 10, N), ``n_pixels`` (B,), ``dates``
  (B, T) and ``start_date`` (B,) as yyyymmdd, ``geometric_features`` (B, 4)) and returns a
  :class:`pandas.DataFrame` with a ``class`` column (class names) and one ``p_<class>``
  probability column per class, rows in input order. It carries its weights (a state dict,
  read with ``torch.load(weights_only=True)``), class names, band statistics, positional
  settings and geometric scaling as plain files, and is logged as *models from code* (the
  few lines of :data:`MODEL_CODE`), so loading it unpickles nothing.
  ``model_config={"device": "cuda"}`` at load time picks the device.
- ``pytorch_module`` (``mlflow.pytorch``): ``mlflow.pytorch.load_model(uri)`` returns the
  :class:`~timematch.models.TimeSeriesClassifier` itself, whose forward takes normalised
  tensors (signature: ``pixels`` float32 (B, T, S, 10), ``mask`` bool (B, S), ``positions``
  int64 (B, T), ``geom`` float32 (B, 4)). It has no input example: MLflow checks an example
  through the flavor's pyfunc, which feeds a module one tensor, never four.

Both carry the predictor's settings as MLmodel metadata (classes, normaliser, positions).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from timematch.data.format import N_BANDS
from timematch.runner import run_names, tracking
from timematch.models import GEOM_DIM
from timematch.serving import ParcelPredictor, check_input

CLASSIFIER_NAME = "parcel_classifier"
MODULE_NAME = "pytorch_module"
PREDICTOR_ARTIFACT = "predictor"
#: What MLflow runs to load the classifier ("models from code": no pickled Python object).
MODEL_CODE = """\
# The parcel classifier of a TimeMatch run (timematch.runner.serving).
from mlflow.models import set_model

from timematch.runner.serving import ParcelClassifier

set_model(ParcelClassifier())
"""


class ParcelClassifier(PythonModel):
    """Pyfunc model over a :class:`~timematch.serving.ParcelPredictor` saved as the
    ``predictor`` artifact; see the module docstring for its input and output."""

    # MLflow would look for type hints on ``predict`` (and warn at class creation): a dict of
    # arrays has none it knows; the logged signature declares and checks the input instead.
    _skip_type_hint_validation = True
    predictor: ParcelPredictor | None = None

    def load_context(self, context) -> None:
        device = (context.model_config or {}).get("device")
        self.predictor = ParcelPredictor.load(context.artifacts[PREDICTOR_ARTIFACT], device=device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.predictor is None:
            raise RuntimeError("ParcelClassifier.predict before load_context: load it with mlflow.pyfunc.load_model")
        names, probs = self.predictor.predict(model_input)
        return prediction_frame(names, probs, self.predictor.classes)


def prediction_frame(names: list[str], probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """``class`` (names) and one ``p_<class>`` column per class, one row per parcel."""
    frame = pd.DataFrame({"class": pd.Series(names, dtype=object)})
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, k].astype(np.float32)
    return frame


def classifier_signature(classes: list[str]):
    """The pyfunc signature: the raw-parcel batch in, class and probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([
        TensorSpec(np.dtype(np.uint16), (-1, -1, N_BANDS, -1), "pixels"),
        TensorSpec(np.dtype(np.int64), (-1,), "n_pixels"),
        TensorSpec(np.dtype(np.int64), (-1, -1), "dates"),
        TensorSpec(np.dtype(np.int64), (-1,), "start_date"),
        TensorSpec(np.dtype(np.float64), (-1, GEOM_DIM), "geometric_features"),
    ])
    outputs = Schema([ColSpec("string", "class"), *(ColSpec("float", f"p_{c}") for c in classes)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def module_signature(num_classes: int):
    """The torch module's forward: normalised tensors in, logits out (features left out)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema([
        TensorSpec(np.dtype(np.float32), (-1, -1, -1, N_BANDS), "pixels"),
        TensorSpec(np.dtype(np.bool_), (-1, -1), "mask"),
        TensorSpec(np.dtype(np.int64), (-1, -1), "positions"),
        TensorSpec(np.dtype(np.float32), (-1, GEOM_DIM), "geom"),
    ])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_parcel_model(
    uri: str,
    run_id: str,
    predictor: ParcelPredictor,
    input_example: dict[str, np.ndarray],
    *,
    pip_requirements: list[str],
    name: str = CLASSIFIER_NAME,
    module_name: str | None = MODULE_NAME,
) -> dict[str, str]:
    """Log ``predictor`` into run ``run_id`` as the pyfunc model ``name`` and its module as
    ``module_name`` (None: skip it); returns the model URIs ``{"classifier": ..., "module": ...}``.

    ``input_example``: a few parcels in the input format (:func:`timematch.serving.example_input`);
    ``pip_requirements``: written as given (inferring them costs seconds per model). Tags the
    run ``classifier_uri`` and ``model_uri`` (the module). The run is addressed by its id, never
    made MLflow's active run, and left as it is (its owner, :mod:`timematch.runner.runs`, ends
    it); MLflow's tracking URI is ``uri`` only while the models are written. Not retried here:
    the caller wraps it in :func:`~timematch.runner.waiting.retry`.
    """
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    from mlflow.models import Model

    example = check_input(input_example)
    metadata = predictor.settings()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    uris: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="parcel_classifier-") as tmp, tracking.using_uri(uri):
        saved = predictor.save(Path(tmp) / PREDICTOR_ARTIFACT)
        code = Path(tmp) / "parcel_classifier.py"
        code.write_text(MODEL_CODE)
        info = Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
            model_id=_new_logged_model(client, run, name), python_model=str(code),
            artifacts={PREDICTOR_ARTIFACT: str(saved)}, signature=classifier_signature(predictor.classes),
            input_example=example, pip_requirements=pip_requirements, metadata=metadata,
        )
        uris["classifier"] = info.model_uri
        client.set_tag(run_id, "classifier_uri", info.model_uri)
        if module_name:
            module = Model.log(
                artifact_path=None, name=module_name, flavor=mlflow.pytorch, run_id=run_id,
                model_id=_new_logged_model(client, run, module_name), pytorch_model=predictor.model,
                serialization_format="pickle", signature=module_signature(len(predictor.classes)),
                pip_requirements=pip_requirements, metadata=metadata,
            )
            uris["module"] = module.model_uri
            client.set_tag(run_id, "model_uri", module.model_uri)
    return uris


def _new_logged_model(client, run, name: str) -> str:
    """A logged model of ``run``, in the run's experiment, named for what it is
    (:func:`~timematch.runner.run_names.logged_model_name`), with the run's params (as MLflow
    gives them to a model it creates for the active run) and the project's entry point as its
    source; its id."""
    params = {key: str(value) for key, value in run.data.params.items()}
    return client.create_logged_model(run.info.experiment_id, name=run_names.logged_model_name(run.data.tags, name),
                                      source_run_id=run.info.run_id, params=params, tags=run_names.SOURCE_TAGS).model_id
