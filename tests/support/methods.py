"""Method budgets the method tests share (tests/test_method_contract.py and tests/test_arrays.py
on the CPU, tests/test_gpu.py on a GPU): a few steps of a method, small enough for a test, and the
source model they start from."""

from pathlib import Path

from timematch.methods import config_fields

#: Two epochs of two steps of 16 samples per domain.
TINY = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 16}


def tiny_config(name: str, budget: dict = TINY) -> dict:
    """``budget`` for method ``name``, with TimeMatch's shift estimation on 2 batches."""
    config = dict(budget)
    if "sample_size" in config_fields(name):
        config["sample_size"] = 2
    return config


def tiny_source(data_root: Path, cache: Path):
    """(spec, pretrained source model) of DK -> FR1 fold 0 on ``data_root``: one tiny epoch of
    source training, cached in ``cache``; the spec is the base each method's trial replaces."""
    from timematch.data.dataset import DataConfig
    from timematch.experiment import ExperimentSpec, pretrain_source

    spec = ExperimentSpec(data_root=data_root, source="DK", target="FR1", method="source_only",
                          pretrain_config={**TINY, "epochs": 1}, data=DataConfig(min_parcels=10), cache_dir=cache)
    return spec, pretrain_source(spec)
