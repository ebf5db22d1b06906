"""Per-trial resources from what a cluster offers: auto defaults, fractional GPUs, impossible asks."""

import pytest

from timematch.errors import ConfigError
from timematch.runner.resources import Cluster, trial_resources


def cluster(cpus: float, gpus: float = 0, nodes: int = 1) -> Cluster:
    return Cluster(address="test", cpus=cpus, gpus=gpus, nodes=nodes, max_node_cpus=cpus / nodes,
                   started_here=False)


def test_cpu_machine_runs_one_trial_per_cpu():
    res = trial_resources(cluster(2), "auto", "auto", "auto")
    assert (res.cpus, res.gpus, res.slots, res.max_concurrent_per_group) == (1, 0, 2, 2)
    assert res.as_ray() == {"cpu": 1, "gpu": 0}


@pytest.mark.parametrize(
    "cpus, gpus, nodes, expected",
    [
        (16, 1, 1, (4, 0.25, 4)),  # one GPU node: four trials share the GPU, four CPUs each
        (16, 2, 1, (2, 0.25, 8)),  # two GPUs on one node: eight trials, the node's CPUs shared
        (64, 8, 2, (2, 0.25, 32)),  # two nodes of 32 CPUs and 4 GPUs: 16 trials per node, 2 CPUs each
        (64, 1, 1, (4, 0.25, 4)),  # many CPUs per GPU: at most 4 per trial
    ],
)
def test_gpu_cluster_auto_shares_a_gpu_between_four_trials(cpus, gpus, nodes, expected):
    res = trial_resources(cluster(cpus, gpus, nodes), "auto", "auto", "auto")
    assert (res.cpus, res.gpus, res.slots) == expected


def test_explicit_fractions_and_concurrency_cap():
    res = trial_resources(cluster(16, 1), 2, 0.5, 8)
    assert (res.cpus, res.gpus, res.slots) == (2, 0.5, 2)
    assert res.max_concurrent_per_group == 2  # never more in flight than the cluster runs
    assert trial_resources(cluster(16, 4), 1, 2, "auto").slots == 2  # whole GPUs above 1


@pytest.mark.parametrize(
    "kind, cpus, gpus, fragment",
    [
        (cluster(2), "auto", 0.5, "the cluster has no GPU; use --gpus-per-trial 0"),
        (cluster(16, 1), "auto", 2, "the cluster has only 1 GPU"),
        (cluster(16, 4), "auto", 1.5, "above 1 it must be a whole number"),
        (cluster(8, 0, nodes=2), 6, "auto", "no node has that many CPUs (largest: 4)"),
        (cluster(2), 0, 0, "a trial needs some CPU or GPU"),
    ],
)
def test_impossible_requests_are_config_errors(kind, cpus, gpus, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        trial_resources(kind, cpus, gpus, "auto")


def test_auto_share_reads_the_measured_curve_of_the_gpu_model():
    from timematch.runner.gpu_share import DEFAULT_SHARE, auto_share

    def point(trials, aggregate, **other):
        return {"method": "timematch", "sharing": "processes", "path": "cuda_graph", "trials": trials,
                "aggregate": aggregate, **other}

    curves = {"NVIDIA H200": [point(1, 200), point(2, 380), point(4, 700), point(8, 740), point(16, 760),
                              point(16, 9000, sharing="streams")]}  # another way of sharing: not read
    share = auto_share("H200", curves)  # Ray's accelerator type matches torch's device name
    assert share.gpus == 0.25 and "4 trials per H200" in share.reason  # 4 -> 8 gains only 6 %
    assert auto_share("NVIDIA A100", curves).gpus == DEFAULT_SHARE
    assert "no measured curve for NVIDIA A100" in auto_share("NVIDIA A100", curves).reason
    assert auto_share(None, curves).gpus == DEFAULT_SHARE
    flat = {"H200": [point(1, 200), point(2, 205)]}
    assert auto_share("NVIDIA H200", flat).gpus == 1.0  # a second trial adds nothing


def test_launch_says_how_auto_chose_the_gpu_share():
    res = trial_resources(Cluster(address="test", cpus=16, gpus=1, nodes=1, max_node_cpus=16, started_here=False,
                                  gpu_type="Z9000"), "auto", "auto", "auto")
    assert res.gpus == 0.25 and "no measured curve for Z9000" in res.describe_gpus()
