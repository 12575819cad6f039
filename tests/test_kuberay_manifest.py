"""examples/kuberay/rayservice.yaml: a YAML parse and a schema check of every field it uses.

The KubeRay fields are checked against the shapes KubeRay's RayService CRD (ray.io/v1)
gives them; serveConfigV2 against Serve's own schema, and its apps are built from their
import paths with their args when Ray is installed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

MANIFEST = Path(__file__).resolve().parents[1] / "examples" / "kuberay" / "rayservice.yaml"


def documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def check_fields(obj: dict, schema: dict, where: str) -> None:
    """``schema``: field -> type, or a nested schema for a mapping; fields not in it are refused."""
    assert isinstance(obj, dict), f"{where} must be a mapping"
    unknown = set(obj) - set(schema)
    assert not unknown, f"{where}: fields not in the schema: {sorted(unknown)}"
    for name, kind in schema.items():
        if name not in obj:
            continue
        if isinstance(kind, dict):
            check_fields(obj[name], kind, f"{where}.{name}")
        else:
            assert isinstance(obj[name], kind), f"{where}.{name} must be {kind}, got {obj[name]!r}"


CONTAINER = {"name": str, "image": str, "env": list, "ports": list,
             "resources": {"requests": dict, "limits": dict}}
POD_TEMPLATE = {"metadata": {"labels": dict}, "spec": {"containers": list}}
RAY_SERVICE = {
    "apiVersion": str, "kind": str, "metadata": {"name": str},
    "spec": {"serveConfigV2": str,
             "rayClusterConfig": {"rayVersion": str,
                                  "headGroupSpec": {"rayStartParams": dict, "template": POD_TEMPLATE},
                                  "workerGroupSpecs": list}},
}
WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                "rayStartParams": dict, "template": POD_TEMPLATE}


def test_ray_service_fields_have_kuberay_shapes():
    service = documents()["RayService"]
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    check_fields(service, RAY_SERVICE, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in cluster["workerGroupSpecs"]:
        check_fields(group, WORKER_GROUP, "workerGroupSpecs[]")
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        for container in group["template"]["spec"]["containers"]:
            check_fields(container, CONTAINER, "container")
            for env in container.get("env", []):
                check_fields(env, {"name": str, "value": str}, "env[]")
            for port in container.get("ports", []):
                check_fields(port, {"containerPort": int, "name": str}, "ports[]")


def test_serve_config_apps_fit_the_cluster_and_the_service():
    docs = documents()
    service = docs["RayService"]["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    apps = {app["name"]: app for app in config["applications"]}
    replicas = apps["gfdit"]["args"]["replicas"]
    api = apps["gfdit-api"]["args"]
    assert api["replicas_app"] == "gfdit"
    # STRICT_PACK: every bundle of a replica on one node, so a worker pod must hold them all.
    worker = service["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert replicas["workers_per_replica"] * replicas["gpus_per_worker"] <= gpus_per_pod
    # The API server actor is pinned to the head by a resource only the head has ...
    head = service["rayClusterConfig"]["headGroupSpec"]
    head_resources = json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert set(api["ray_actor_options"]["resources"]) <= set(head_resources)
    # ... where the Service sends traffic, on the port the server listens on.
    kube_service = docs["Service"]
    assert kube_service["spec"]["selector"].items() <= head["template"]["metadata"]["labels"].items()
    assert kube_service["spec"]["ports"][0]["targetPort"] == api["server"]["port"]
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert api["server"]["port"] in head_ports


def test_serve_config_passes_serves_schema_and_its_apps_build():
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(documents()["RayService"]["spec"]["serveConfigV2"])
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(config)
    for app in config["applications"]:
        module, name = app["import_path"].split(":")
        built = getattr(importlib.import_module(module), name)(app["args"])
        assert type(built).__name__ == "Application"
