"""The Helm chart (helm/sam2serve), rendered by Helm's own Go SDK and validated against Kubernetes' schemas.

No cluster and no helm binary: `helm-python-sdk` binds Helm v4's Go SDK (the code `helm template` runs,
including values.schema.json validation), and `kubernetes-validate` checks every rendered object against
the OpenAPI schemas of a current Kubernetes release in strict mode (unknown fields are errors). The two
CRD kinds (KEDA ScaledObject, Prometheus Operator ServiceMonitor) have no schema there: they are checked
against structural schemas written from their CRDs below, plus assertions on the fields that matter.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import import_required, require

# The dev extra installs all of these, so in CI (CI=true) their absence fails instead of skipping.
yaml = import_required("yaml", "PyYAML is not installed (it comes with kubernetes-validate)")
jsonschema = import_required("jsonschema", "jsonschema is not installed (it comes with kubernetes-validate)")
kv_utils = import_required("kubernetes_validate.utils", "kubernetes-validate is not installed")
helm = import_required("helm_python", "helm-python-sdk (Helm's Go SDK for Python) is not installed")
try:
    HELM_SDK_VERSION = helm.helm_sdk_version()
except Exception as e:  # the bundled native library does not load on this platform
    require(False, f"helm-python-sdk is installed but its native library does not load: {e}")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "sam2serve"
RELEASE, NAMESPACE = "demo", "ml"
FULLNAME = f"{RELEASE}-sam2serve"
KUBE_VERSION = kv_utils.latest_version()  # the newest Kubernetes release kubernetes-validate has schemas for
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

GPU_KEDA: dict[str, Any] = {
    "gpu": {"enabled": True, "runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
    "engines": {"tensorrt": {"enabled": True, "fp16": True}, "export": {"fp16": True}},
    "server": {"providers": "CUDAExecutionProvider,CPUExecutionProvider"},
    "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
    "autoscaling": {
        "mode": "keda",
        "minReplicas": 1,
        "maxReplicas": 8,
        "targetQueueDepthPerPod": 2,
        "keda": {"serverAddress": "http://prometheus.monitoring.svc:9090", "activationThreshold": 1},
    },
}
HPA_MONITOR_PVC: dict[str, Any] = {
    "autoscaling": {"mode": "hpa", "minReplicas": 2, "maxReplicas": 10},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "service": {"headless": {"enabled": True}},
    "engines": {"source": "pvc", "pvc": {"claimName": "sam2-engines", "subPath": "v1"}},
    "server": {"apiKey": {"existingSecret": "sam2serve-auth"}, "workers": 2, "queueSize": 32},
    "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 1},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "cpu-default": {},
    "gpu-keda": GPU_KEDA,
    "hpa-servicemonitor-headless-pvc": HPA_MONITOR_PVC,
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None = None, release: str = RELEASE) -> dict[tuple[str, str], dict]:
    """{(kind, name): object} of everything the chart renders (NOTES.txt excluded)."""
    manifests = chart.render(copy.deepcopy(values) if values else None, name=release, namespace=NAMESPACE)
    objects: dict[tuple[str, str], dict] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} rendered twice"
            objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, dict[tuple[str, str], dict]]:
    return {name: render(chart, values) for name, values in VALUE_SETS.items()}


def kinds(objects: dict[tuple[str, str], dict]) -> set[str]:
    return {kind for kind, _ in objects}


def deployment(objects) -> dict:
    return objects[("Deployment", FULLNAME)]


def pod_spec(objects) -> dict:
    return deployment(objects)["spec"]["template"]["spec"]


def container(objects, name: str = "sam2serve") -> dict:
    spec = pod_spec(objects)
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def port_number(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


# Structural schemas of the two CRD kinds, from keda.sh_scaledobjects.yaml (KEDA 2.x) and
# monitoring.coreos.com_servicemonitors.yaml (prometheus-operator v0.7x+), reduced to the fields a chart sets.
_METADATA = {
    "type": "object",
    "required": ["name", "namespace", "labels"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {k: {"type": "string"} for k in ("apiVersion", "kind", "name",
                                                                     "envSourceContainerName")},
                },
                **{k: _INT32 for k in ("minReplicaCount", "maxReplicaCount", "idleReplicaCount", "pollingInterval",
                                       "cooldownPeriod", "initialCooldownPeriod")},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # map[string]string in the CRD: a number here is rejected by the API server
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": _INT32,
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            "tlsConfig": {"type": "object"},
                            "params": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {"ScaledObject": SCALED_OBJECT_SCHEMA, "ServiceMonitor": SERVICE_MONITOR_SCHEMA}


def validate_object(obj: dict) -> None:
    if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
        jsonschema.Draft202012Validator(CRD_SCHEMAS[obj["kind"]]).validate(obj)
    else:
        kv_utils.validate(obj, KUBE_VERSION, strict=True)


# --- rendering and validation --------------------------------------------------------------------------------------


def test_validator_targets_a_current_kubernetes():
    major, minor = (int(x) for x in KUBE_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33), f"kubernetes-validate only knows Kubernetes {KUBE_VERSION}: upgrade it"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_renders_and_every_object_validates(rendered, value_set):
    objects = rendered[value_set]
    expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    assert expected <= kinds(objects)
    for (kind, name), obj in objects.items():
        assert obj["metadata"]["namespace"] == NAMESPACE, (kind, name)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert obj["metadata"]["labels"]["helm.sh/chart"] == "sam2serve-0.1.0"
        try:
            validate_object(obj)
        except Exception as e:
            pytest.fail(f"{value_set}: {kind}/{name} is not valid for Kubernetes {KUBE_VERSION}: {e}")


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm_lint_is_clean(value_set):
    report = helm.lint(CHART, copy.deepcopy(VALUE_SETS[value_set]) or None, strict=True,
                       kube_version=f"v{KUBE_VERSION}.0", namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert problems == []


def test_validation_catches_a_broken_object():
    """The validators used above do reject what the API server would: strict mode, CRD schemas."""
    bad_deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                      "spec": {"selector": {}, "template": {"spec": {"containers": [
                          {"name": "c", "image": "i", "readinessProbe": {"grpc": {"port": "grpc"}}}]}}}}
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(bad_deployment, KUBE_VERSION, strict=True)  # named ports are not allowed in grpc probes
    typo = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(typo, KUBE_VERSION, strict=True)
    scaled = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
              "metadata": {"name": "x", "namespace": "ml", "labels": {}},
              "spec": {"scaleTargetRef": {"name": "x"},
                       "triggers": [{"type": "prometheus", "metadata": {"threshold": 4}}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate_object(scaled)  # trigger metadata values must be strings


# --- CPU default ---------------------------------------------------------------------------------------------------


def test_cpu_default(rendered):
    objects = rendered["cpu-default"]
    assert kinds(objects) == {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert config == {"SAM2SERVE_ENGINES": "/engines/sam2.1_hiera_tiny", "SAM2SERVE_PORT": "50051",
                      "SAM2SERVE_METRICS_PORT": "9090", "SAM2SERVE_METRICS_HOST": "0.0.0.0",
                      "SAM2SERVE_DRAIN_SECONDS": "30"}
    dep = deployment(objects)
    assert dep["spec"]["replicas"] == 1
    spec = pod_spec(objects)
    server = container(objects)
    assert server["image"] == "sam2serve:0.1.0"
    assert server["command"] == ["sam2serve", "serve"]
    assert server["envFrom"] == [{"configMapRef": {"name": FULLNAME}}]
    assert "env" not in server  # no API key unless asked for
    assert spec["enableServiceLinks"] is False  # else a Service named sam2serve injects SAM2SERVE_PORT=tcp://…
    assert spec["automountServiceAccountToken"] is False

    # engines exported by an init container into a per-pod emptyDir, served read-only
    [export] = spec["initContainers"]
    assert export["name"] == "export-engines"
    assert export["image"] == "sam2serve-export:0.1.0"
    assert export["command"] == ["/bin/sh", "/scripts/export-engines.sh", "--model", "sam2.1_hiera_tiny",
                                 "--download"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["engines"] == {"name": "engines", "emptyDir": {"sizeLimit": "4Gi"}}
    assert volumes["scripts"]["configMap"]["name"] == f"{FULLNAME}-scripts"
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["engines"] == {"name": "engines", "mountPath": "/engines", "readOnly": True}
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    init_mounts = {m["name"]: m for m in export["volumeMounts"]}
    assert not init_mounts["engines"].get("readOnly", False)  # the init container writes the engines

    service = objects[("Service", FULLNAME)]["spec"]
    assert service["type"] == "ClusterIP"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]} == {
        "grpc": (50051, "grpc"), "metrics": (9090, "metrics")}
    assert objects[("PodDisruptionBudget", FULLNAME)]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_probes_are_grpc_on_the_serving_port(rendered, value_set):
    objects = rendered[value_set]
    server = container(objects)
    grpc_port = port_number(server, "grpc")
    assert grpc_port == 50051
    assert objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_PORT"] == str(grpc_port)
    assert objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_METRICS_PORT"] == str(port_number(server, "metrics"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": grpc_port}, probe  # integer port, overall health ("" service)
        assert "httpGet" not in server[probe] and "exec" not in server[probe] and "tcpSocket" not in server[probe]
    # the startup probe gives the engines time to load; liveness only starts after it succeeded
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 120


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_security_context(rendered, value_set):
    spec = pod_spec(rendered[value_set])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), c["name"]


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_grace_period_outlasts_the_drain(rendered, value_set):
    objects = rendered[value_set]
    drain = int(objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_DRAIN_SECONDS"])
    spec = pod_spec(objects)
    pre_stop = container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] == pre_stop + drain + 15
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_probes_can_ask_for_a_named_health_service(chart):
    objects = render(chart, {"probes": {"grpcService": "sam2serve.v1.Segmenter"}, "server": {"grpcPort": 8443}})
    server = container(objects)
    assert port_number(server, "grpc") == 8443
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": 8443, "service": "sam2serve.v1.Segmenter"}
    kv_utils.validate(deployment(objects), KUBE_VERSION, strict=True)


def test_grace_period_follows_a_longer_drain(chart):
    objects = render(chart, {"server": {"drainSeconds": 120}, "preStopSleepSeconds": 0})
    assert pod_spec(objects)["terminationGracePeriodSeconds"] == 135
    assert "lifecycle" not in container(objects)
    assert objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_DRAIN_SECONDS"] == "120"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_gpu_only_in_the_gpu_set(rendered, value_set):
    spec = pod_spec(rendered[value_set])
    gpu_set = value_set == "gpu-keda"
    for c in spec["containers"] + spec.get("initContainers", []):
        resources = c.get("resources", {})
        wants_gpu = gpu_set and c["name"] in ("sam2serve", "tensorrt-plans")  # the ONNX export runs on CPU
        for part in ("limits", "requests"):
            assert (resources.get(part, {}).get("nvidia.com/gpu") == 1) is wants_gpu, (c["name"], part)
        assert ("nvidia.com/gpu" in str(resources)) is wants_gpu, c["name"]
    assert ("runtimeClassName" in spec) is gpu_set
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])) is gpu_set


# --- GPU + KEDA ----------------------------------------------------------------------------------------------------


def test_gpu_keda(rendered):
    objects = rendered["gpu-keda"]
    assert ("ScaledObject", FULLNAME) in objects
    assert "HorizontalPodAutoscaler" not in kinds(objects)  # KEDA makes its own
    assert "replicas" not in deployment(objects)["spec"]  # the autoscaler owns the replica count
    spec = pod_spec(objects)
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    server = container(objects)
    assert server["resources"] == {"requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 1},
                                   "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert config["SAM2SERVE_PROVIDERS"] == "CUDAExecutionProvider,CPUExecutionProvider"

    # export (CPU) then TensorRT plans on the node's GPU, both writing to the engine volume
    assert [c["name"] for c in spec["initContainers"]] == ["export-engines", "tensorrt-plans"]
    assert container(objects, "export-engines")["command"][-2:] == ["--download", "--fp16"]
    assert container(objects, "tensorrt-plans")["command"] == ["/bin/sh", "/scripts/tensorrt-plans.sh", "--fp16"]

    scaled = objects[("ScaledObject", FULLNAME)]["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 8)
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus.monitoring.svc:9090",
        "query": f'sum(sam2serve_queue_depth{{namespace="{NAMESPACE}",service="{FULLNAME}"}})',
        "threshold": "2",
        "activationThreshold": "1",
    }
    # the HPA behavior KEDA passes on is a valid autoscaling/v2 behavior
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2, "behavior": behavior}}
    kv_utils.validate(hpa, KUBE_VERSION, strict=True)


def test_keda_query_can_be_replaced(chart):
    query = 'sum(sam2serve_queue_depth{kubernetes_namespace="ml"})'
    objects = render(chart, {"autoscaling": {"mode": "keda", "targetQueueDepthPerPod": 0.5,
                                             "keda": {"query": query, "authenticationRef": "prom-auth"}}})
    [trigger] = objects[("ScaledObject", FULLNAME)]["spec"]["triggers"]
    assert trigger["metadata"]["query"] == query
    assert trigger["metadata"]["threshold"] == "0.5"
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    validate_object(objects[("ScaledObject", FULLNAME)])


# --- HPA + ServiceMonitor + headless + PVC -------------------------------------------------------------------------


def test_hpa_servicemonitor_headless_pvc(rendered):
    objects = rendered["hpa-servicemonitor-headless-pvc"]
    assert "ScaledObject" not in kinds(objects)
    assert "replicas" not in deployment(objects)["spec"]

    hpa = objects[("HorizontalPodAutoscaler", FULLNAME)]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "sam2serve_queue_depth"},
        "target": {"type": "AverageValue", "averageValue": "4"}}}]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300

    # the ServiceMonitor scrapes the metrics port of the main Service
    monitor = objects[("ServiceMonitor", FULLNAME)]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = objects[("Service", FULLNAME)]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= deployment(objects)["spec"]["template"]["metadata"]["labels"].items()

    # headless: one record per ready pod, gRPC only (so its endpoints are never scraped twice)
    headless = objects[("Service", f"{FULLNAME}-headless")]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is False
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("grpc", 50051)]

    # engines from the PVC, read-only, no export
    spec = pod_spec(objects)
    assert "initContainers" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["engines"]["persistentVolumeClaim"] == {"claimName": "sam2-engines", "readOnly": True}
    assert "scripts" not in volumes
    assert ("ConfigMap", f"{FULLNAME}-scripts") not in objects
    server = container(objects)
    mount = next(m for m in server["volumeMounts"] if m["name"] == "engines")
    assert mount == {"name": "engines", "mountPath": "/engines", "subPath": "v1", "readOnly": True}

    # API key from the existing Secret, server settings through the ConfigMap
    assert server["env"] == [{"name": "SAM2SERVE_API_KEY",
                              "valueFrom": {"secretKeyRef": {"name": "sam2serve-auth", "key": "api-key"}}}]
    assert "Secret" not in kinds(objects)
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert (config["SAM2SERVE_WORKERS"], config["SAM2SERVE_QUEUE_SIZE"]) == ("2", "32")
    assert objects[("PodDisruptionBudget", FULLNAME)]["spec"] == {
        "selector": {"matchLabels": selector}, "minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow"}


def test_tensorrt_on_a_pvc_mounts_it_writable_for_the_init_container_only(chart):
    objects = render(chart, {"gpu": {"enabled": True}, "engines": {
        "source": "pvc", "pvc": {"claimName": "engines"}, "tensorrt": {"enabled": True}}})
    spec = pod_spec(objects)
    assert [c["name"] for c in spec["initContainers"]] == ["tensorrt-plans"]
    engines = next(v for v in spec["volumes"] if v["name"] == "engines")
    assert engines["persistentVolumeClaim"] == {"claimName": "engines"}
    trt = container(objects, "tensorrt-plans")
    assert not next(m for m in trt["volumeMounts"] if m["name"] == "engines").get("readOnly", False)
    assert next(m for m in container(objects)["volumeMounts"] if m["name"] == "engines")["readOnly"] is True
    for obj in objects.values():
        validate_object(obj)


def test_chart_managed_api_key_secret(chart):
    objects = render(chart, {"server": {"apiKey": {"value": "s3cret"}}})
    secret = objects[("Secret", f"{FULLNAME}-api-key")]
    assert secret["data"] == {"api-key": "czNjcmV0"}
    assert container(objects)["env"][0]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-api-key",
                                                                         "key": "api-key"}
    kv_utils.validate(secret, KUBE_VERSION, strict=True)


def test_tenant_keys_and_the_webhook_secret_come_from_existing_secrets(chart):
    objects = render(chart, {"server": {"apiKeys": {"existingSecret": "tenants"},
                                        "webhookSecret": {"existingSecret": "hooks", "secretKey": "hmac"}}})
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["SAM2SERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "tenants", "key": "api-keys"}
    assert env["SAM2SERVE_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "hooks", "key": "hmac"}
    assert not [k for k in objects if k[0] == "Secret"]  # the chart never holds these values itself
    for obj in objects.values():
        validate_object(obj)
    plain = {e["name"] for e in container(render(chart, {})).get("env", [])}
    assert not plain & {"SAM2SERVE_API_KEYS", "SAM2SERVE_WEBHOOK_SECRET"}


def test_shared_queue_url_comes_from_a_secret(chart):
    objects = render(chart, {"server": {"redis": {"url": "redis://:pw@redis:6379/0"}}})
    secret = objects[("Secret", f"{FULLNAME}-redis")]
    assert secret["data"] == {"redis-url": "cmVkaXM6Ly86cHdAcmVkaXM6NjM3OS8w"}
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["SAM2SERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-redis", "key": "redis-url"}
    assert objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_REDIS_PREFIX"] == f"{FULLNAME}:"
    kv_utils.validate(secret, KUBE_VERSION, strict=True)

    objects = render(chart, {"server": {"redis": {"existingSecret": "queue", "secretKey": "url", "prefix": "a"}}})
    assert not [k for k in objects if k[0] == "Secret"]
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["SAM2SERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "queue", "key": "url"}
    assert objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_REDIS_PREFIX"] == "a:"
    plain = render(chart, {})
    assert "SAM2SERVE_REDIS_PREFIX" not in plain[("ConfigMap", FULLNAME)]["data"]
    assert "SAM2SERVE_REDIS_URL" not in {e["name"] for e in container(plain).get("env", [])}


def test_metrics_token_comes_from_a_secret_and_the_servicemonitor_sends_it(chart):
    """Before, the chart had no way to set SAM2SERVE_METRICS_TOKEN from a Secret, though the metrics port
    listens on every pod address."""
    monitor = {"serviceMonitor": {"enabled": True}}
    objects = render(chart, {"metrics": {"token": {"existingSecret": "scrape", "secretKey": "t"}, **monitor}})
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["SAM2SERVE_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "scrape", "key": "t"}
    endpoint = objects[("ServiceMonitor", FULLNAME)]["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "scrape", "key": "t"}}
    assert not [k for k in objects if k[0] == "Secret"]

    objects = render(chart, {"metrics": {"token": {"value": "s3cret"}, **monitor}})
    secret = objects[("Secret", f"{FULLNAME}-metrics-token")]
    assert secret["data"] == {"metrics-token": "czNjcmV0"}
    kv_utils.validate(secret, KUBE_VERSION, strict=True)
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["SAM2SERVE_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-metrics-token",
                                                                            "key": "metrics-token"}
    plain = render(chart, {"metrics": monitor})
    assert "SAM2SERVE_METRICS_TOKEN" not in {e["name"] for e in container(plain).get("env", [])}
    assert "authorization" not in plain[("ServiceMonitor", FULLNAME)]["spec"]["endpoints"][0]


def test_fal_http_api_behind_a_switch(chart):
    values = {"server": {"http": {"enabled": True, "port": 8443, "publicUrl": "https://sam2.example.com"},
                         "redis": {"url": "redis://:pw@redis:6379/0"}}, "service": {"httpPort": 443},
              "replicaCount": 3}
    objects = render(chart, values)
    for obj in objects.values():
        validate_object(obj)
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert (config["SAM2SERVE_HTTP_PORT"], config["SAM2SERVE_PUBLIC_URL"]) == ("8443", "https://sam2.example.com")
    server = container(objects)
    assert port_number(server, "http") == 8443
    service = {p["name"]: p for p in objects[("Service", FULLNAME)]["spec"]["ports"]}
    assert (service["http"]["port"], service["http"]["targetPort"], service["http"]["appProtocol"]) == (
        443, "http", "http")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # probes unchanged: gRPC health
        assert server[probe]["grpc"] == {"port": 50051}
    notes = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)["sam2serve/templates/NOTES.txt"]
    assert f"fal's HTTP API: http://{FULLNAME}.{NAMESPACE}.svc:443" in notes and "WARNING" not in notes

    # several replicas without a shared queue: the NOTES say why that breaks fal's status and result calls
    del values["server"]["redis"]
    notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)["sam2serve/templates/NOTES.txt"]
    assert "WARNING: several replicas without server.redis" in notes
    with pytest.raises(Exception, match="publicUrl"):
        render(chart, {"server": {"http": {"enabled": True, "port": 8080, "publicUrl": "sam2.example.com"}}})


@pytest.mark.parametrize("release", ["sam2serve", "r" * 53])
def test_names_fit_kubernetes_limits(chart, release):
    objects = render(chart, {"service": {"headless": {"enabled": True}}, "autoscaling": {"mode": "hpa"}},
                     release=release)
    for kind, name in objects:
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), (kind, name)
    for obj in objects.values():
        validate_object(obj)


# --- values.schema.json ---------------------------------------------------------------------------------------------


def test_default_values_pass_the_schema(chart):
    chart.validate_schema(None)
    for values in VALUE_SETS.values():
        chart.validate_schema(copy.deepcopy(values))


@pytest.mark.parametrize(("values", "where"), [
    ({"replicaCount": "2"}, "/replicaCount"),
    ({"replicas": 2}, "replicas"),  # a typo: unknown keys are refused
    ({"autoscaling": {"mode": "vpa"}}, "/autoscaling/mode"),
    ({"autoscaling": {"minReplicas": 0}}, "/autoscaling/minReplicas"),
    ({"autoscaling": {"targetQueueDepthPerPod": 0}}, "/autoscaling/targetQueueDepthPerPod"),
    ({"server": {"grpcPort": 70000}}, "/server/grpcPort"),
    ({"terminationGraceMarginSeconds": 0}, "/terminationGraceMarginSeconds"),
    ({"engines": {"source": "pvc"}}, "/engines/pvc/claimName"),
    ({"engines": {"model": "sam3_hiera_tiny"}}, "/engines/model"),
    ({"gpu": {"count": "one"}}, "/gpu/count"),
    ({"server": {"encoderPrecision": "int4"}}, "/server/encoderPrecision"),
    ({"server": {"redis": {"url": "http://redis:6379"}}}, "/server/redis/url"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(copy.deepcopy(values))
    with pytest.raises(helm.HelmValuesError):  # `helm install/template` refuse them too
        chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(("values", "message"), [
    ({"engines": {"tensorrt": {"enabled": True}}}, "engines.tensorrt.enabled needs gpu.enabled"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "maxReplicas must be >= autoscaling.minReplicas"),
    ({"podDisruptionBudget": {"minAvailable": 1}}, "not both"),
    ({"server": {"encoderPrecision": "int8"}}, "server.encoderPrecision int8 needs engines.export.int8Encoder"),
])
def test_template_rejects_inconsistent_values(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- init container scripts -----------------------------------------------------------------------------------------

FAKE_SAM2SERVE = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$1" in
  check-engines) if [ -n "${CHECK_OUTPUT:-}" ]; then echo "$CHECK_OUTPUT"; exit 0; fi; echo "bad" >&2; exit 2 ;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def scripts(rendered, tmp_path_factory) -> Path:
    """The init container scripts from the rendered ConfigMap, as files (what the pod mounts at /scripts)."""
    data = rendered["gpu-keda"][("ConfigMap", f"{FULLNAME}-scripts")]["data"]
    assert set(data) == {"export-engines.sh", "tensorrt-plans.sh", "trt_plans_ready.py"}
    directory = tmp_path_factory.mktemp("scripts")
    for name, text in data.items():
        (directory / name).write_text(text)
    return directory


def run_script(tmp_path: Path, script: Path, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "sam2serve"
    fake.write_text(FAKE_SAM2SERVE)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
                "CALLS": str(calls), "TMPDIR": str(tmp_path), "SAM2SERVE_ENGINES": str(tmp_path / "engines" / "m"),
                **env}
    result = subprocess.run(["/bin/sh", str(script), *args], env=full_env, capture_output=True, text=True,
                            timeout=60)
    return result, calls.read_text().splitlines()


def test_init_scripts_parse(scripts):
    for name in ("export-engines.sh", "tensorrt-plans.sh"):
        result = subprocess.run(["/bin/sh", "-n", str(scripts / name)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    compile((scripts / "trt_plans_ready.py").read_text(), "trt_plans_ready.py", "exec")


TRAINED = '{"model": "m", "weights": "download", "trained": true}'
UNTRAINED = '{"model": "m", "weights": "untrained", "trained": false}'


@pytest.mark.parametrize(("manifest", "check_output", "weights", "exports"), [
    (False, "", "download", True),  # nothing there yet
    (True, TRAINED, "download", False),  # a valid export on the PVC: reused
    (True, "", "download", True),  # present but check-engines refuses it
    (True, UNTRAINED, "download", True),  # untrained leftovers while real weights are asked for
    (True, UNTRAINED, "untrained", False),
])
def test_export_script_reuses_valid_engines_only(tmp_path, scripts, manifest, check_output, weights, exports):
    engines = tmp_path / "engines" / "m"
    if manifest:
        engines.mkdir(parents=True)
        (engines / "manifest.json").write_text("{}")
    result, calls = run_script(tmp_path, scripts / "export-engines.sh", ["--model", "m", f"--{weights}"],
                               CHECK_OUTPUT=check_output, ENGINE_WEIGHTS=weights)
    assert result.returncode == 0, result.stderr
    export_call = (f"export --out {engines} --cache-dir {tmp_path}/checkpoints --quiet --model m --{weights}")
    assert (export_call in calls) is exports, calls
    assert calls[0].startswith("check-engines") is manifest
    if manifest:
        assert calls[0].endswith("--encoder-precision fp32"), calls


def test_int8_encoder_is_opt_in_and_built_before_it_is_served(tmp_path, chart):
    values = {"server": {"encoderPrecision": "int8"}, "engines": {"export": {"int8Encoder": True}}}
    objects = render(chart, values)
    assert objects[("ConfigMap", FULLNAME)]["data"]["SAM2SERVE_ENCODER_PRECISION"] == "int8"
    assert "SAM2SERVE_ENCODER_PRECISION" not in render(chart)[("ConfigMap", FULLNAME)]["data"]  # the server's fp32
    init = {c["name"]: c for c in objects[("Deployment", FULLNAME)]["spec"]["template"]["spec"]["initContainers"]}
    assert "--int8-encoder" in init["export-engines"]["command"]
    # engines on a PVC without the variant do not pass the init container's check: it exports again
    script = tmp_path / "export-engines.sh"
    script.write_text(objects[("ConfigMap", f"{FULLNAME}-scripts")]["data"]["export-engines.sh"])
    engines = tmp_path / "engines" / "m"
    engines.mkdir(parents=True)
    (engines / "manifest.json").write_text("{}")
    result, calls = run_script(tmp_path, script, ["--model", "m", "--download", "--int8-encoder"])
    assert result.returncode == 0, result.stderr
    assert calls[0].endswith("--encoder-precision int8") and calls[1].startswith("export --out"), calls


def test_tensorrt_script_builds_when_no_plans_are_reusable(tmp_path, scripts):
    # trt_plans_ready.py runs for real: without tensorrt (or plans) it says "build"
    result, calls = run_script(tmp_path, scripts / "tensorrt-plans.sh", ["--fp16"])
    assert result.returncode == 0, result.stderr
    assert "no reusable plans" in result.stdout
    assert calls == [f"export trt --engines {tmp_path}/engines/m --quiet --fp16"]


# --- the container image agrees with the chart -----------------------------------------------------------------------


def test_dockerfile_matches_the_chart(chart):
    dockerfile = (ROOT / "Dockerfile").read_text()
    values = chart.values
    uid = values["podSecurityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}(:{uid})?$", dockerfile, re.M), "the image runs as the chart's uid"
    expose = re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)
    ports = {str(values["server"]["grpcPort"]), str(values["server"]["metricsPort"]),
             str(values["server"]["http"]["port"])}
    assert expose and set(expose[-1].split()) == ports
    assert re.search(r'^ENTRYPOINT \["sam2serve", "serve"\]$', dockerfile, re.M)
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S))
    assert list(stages)[-1] == "server", "the server is the default (last) target"
    assert "export" in stages, "the init containers' image target"
    server_stage = "\n".join(line for line in stages["server"].splitlines() if not line.lstrip().startswith("#"))
    assert "torch==" not in server_stage and "[export" not in server_stage
    assert "requirements-sam2.txt" in stages["export"] and "--require-hashes" in stages["export"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "engines", "checkpoints"} <= {p.strip("/*") for p in ignored}


def test_notes_render(chart):
    notes = chart.render(copy.deepcopy(GPU_KEDA), name=RELEASE, namespace=NAMESPACE)["sam2serve/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} get scaledobject {FULLNAME}" in notes
    untrained = chart.render({"engines": {"export": {"weights": "untrained"}}}, name=RELEASE, namespace=NAMESPACE)
    assert "MEANINGLESS" in untrained["sam2serve/templates/NOTES.txt"]
