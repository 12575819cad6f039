"""The Serve application: ``ReplicaOptions`` become Serve's deployment options, and the
builders that Serve configs name refuse what they do not know."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")

from entrypoints.ray_serve import deployment, frontend  # noqa: E402
from entrypoints.ray_serve.deployment import ReplicaOptions, replica_engine_options  # noqa: E402


def test_replica_options_become_serve_deployment_options():
    fixed = ReplicaOptions(num_replicas=3, workers_per_replica=4, gpus_per_worker=1, cpus_per_worker=2)
    options = fixed.deployment_options(max_batch_size=16)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 32  # twice the batch: full batches, no pile-up on one replica
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] * 4
    # The replica actor's own resources come out of the first bundle.
    assert options["ray_actor_options"] == {
        "num_cpus": 2, "num_gpus": 1, "runtime_env": {"env_vars": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}}
    assert replica_engine_options({"model": "m"}, fixed) == {"model": "m", "num_workers": 4}

    scaled = ReplicaOptions(num_replicas=None, min_replicas=0, max_replicas=5, target_ongoing_requests=4)
    autoscaling = scaled.deployment_options(max_batch_size=8)["autoscaling_config"]
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.initial_replicas) == (0, 5, 1)
    assert autoscaling.target_ongoing_requests == 4
    assert scaled.bundles == [{"CPU": 1.0}]
    assert ReplicaOptions(max_ongoing_requests=5).deployment_options(8)["max_ongoing_requests"] == 5
    assert replica_engine_options({"model": "m"}, scaled) == {"model": "m", "num_workers": 1, "device": "cpu",
                                                              "worker_threads": 1}


def test_builders_refuse_unknown_args_and_options():
    with pytest.raises(ValueError, match="unknown app args"):
        deployment.app_builder({"engin": {"model": "tiny-pixart"}})
    with pytest.raises(TypeError, match="unknown engine option"):
        deployment.app_builder({"engine": {"modle": "tiny-pixart"}})
    with pytest.raises(TypeError):
        deployment.app_builder({"replicas": {"replica_count": 2}})
    with pytest.raises(ValueError, match="unknown app args"):
        frontend.app_builder({"port": 8000})
    with pytest.raises(TypeError):
        frontend.app_builder({"server": {"listen": "0.0.0.0"}})


def test_replica_options_are_checked():
    with pytest.raises(ValueError, match="workers per replica"):
        ReplicaOptions(workers_per_replica=0)
    with pytest.raises(ValueError, match="replicas must be"):
        ReplicaOptions(num_replicas=0)
