"""Method budgets the method tests share (tests/test_method_contract.py on the CPU,
tests/test_gpu.py on a GPU): a few steps of a method, small enough for a test."""

from timematch.methods import config_fields

#: Two epochs of two steps of 16 samples per domain.
TINY = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 16}


def tiny_config(name: str, budget: dict = TINY) -> dict:
    """``budget`` for method ``name``, with TimeMatch's shift estimation on 2 batches."""
    config = dict(budget)
    if "sample_size" in config_fields(name):
        config["sample_size"] = 2
    return config
