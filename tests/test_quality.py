"""The method works: on DK -> FR1 of the default synthetic data, TimeMatch recovers the
planted shift and beats source-only clearly; FixMatch does not beat TimeMatch.

A small budget (a few minutes on 2 CPU cores); benchmarks/quality.py prints the full table.
"""

import pytest

from timematch.data.dataset import DataConfig
from timematch.data.synthetic import generate_dataset, read_ground_truth
from timematch.experiment import ExperimentSpec, pretrain_source, run_experiment

PRETRAIN = {"epochs": 10, "steps_per_epoch": 25}
ADAPT = {"epochs": 5, "steps_per_epoch": 25}


@pytest.mark.slow
def test_timematch_beats_source_only_on_dk_fr1(tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, tiles=["DK", "FR1"])  # default size and seed
    planted = read_ground_truth(root)["expected_shifts"]["DK->FR1"]
    spec = ExperimentSpec(data_root=root, source="DK", target="FR1", method="source_only",
                          pretrain_config=PRETRAIN, data=DataConfig(min_parcels=50), cache_dir=tmp_path / "cache")
    pretrained = pretrain_source(spec)
    f1 = {}
    for method, config in [("source_only", {}), ("fixmatch", ADAPT), ("timematch", dict(ADAPT, sample_size=8))]:
        result = run_experiment(spec.replace(method=method, method_config=config), pretrained)
        f1[method] = result.metrics["test_macro_f1"]
        if method == "timematch":
            estimated = result.metrics["estimated_shift"]
    assert abs(estimated - planted) <= 5, (estimated, planted)
    assert f1["timematch"] >= f1["source_only"] + 0.10, f1
    assert f1["fixmatch"] <= f1["timematch"], f1
