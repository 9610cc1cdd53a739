"""Deployment artifacts (deploy/): schemas, chart rendering, graceful-rollout numbers, the image.

Built-in kinds validate against the Kubernetes schemas of ``kubernetes-validate``; the custom
resources (ServiceMonitor, ServingRuntime, InferenceService) have no schema there, so their
fields are checked against what the Prometheus Operator and KServe require, and their pod parts
(containers) against the core schemas. No helm binary is to be had here: the chart is rendered
by ``deploy/helm/render.py`` (the template subset the chart keeps to) and must equal the plain
manifests; where helm exists, its own rendering must equal ours.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tritonclient.grpc as grpcclient
import yaml

from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.model_config import load_config
from pagedserve.repository.names import model_names
from pagedserve.server import app as server_app
from pagedserve.server.cli import add_arguments
from tests.conftest import hf_greedy
from tests.server.conftest import MODEL, is_final, llm_inputs, text_of

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "pagedserve"
REPOSITORY = ROOT / "model_repository"
CONTAINERFILE = DEPLOY / "Containerfile"
K8S_VERSION = kubernetes_validate.latest_version()
# The image build takes about 10 minutes on a busy 2-core machine; the fixture's time counts
# against the first test that uses it.
BUILD_TIMEOUT_S = 1800
# Seconds past the server's own bounds (grace period, CUT_WRITE_SECONDS, STOP_SECONDS in
# backend/server/app.py) for the interpreter's exit after them.
EXIT_MARGIN = 3

_spec = importlib.util.spec_from_file_location("helm_render", DEPLOY / "helm" / "render.py")
assert _spec is not None and _spec.loader is not None
helm_render = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = helm_render  # dataclasses look their module up there
_spec.loader.exec_module(helm_render)


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
            for doc in _documents(path)]


def _kserve() -> dict[str, dict[str, Any]]:
    docs = [doc for path in sorted((DEPLOY / "kserve").glob("*.yaml")) for doc in _documents(path)]
    return {doc["kind"]: doc for doc in docs}


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = _by_kind(docs, kind)
    return doc


def _server_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([])


CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}


def _validate(doc: dict[str, Any]) -> None:
    """Built-in kinds against the Kubernetes schemas; strict: unknown fields are errors."""
    assert doc["kind"] not in CUSTOM_KINDS
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _validate_containers(containers: list[dict[str, Any]], **pod_spec: Any) -> None:
    """Containers of a custom resource, checked as the core schema checks a Pod's."""
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
               "spec": {"containers": containers, **pod_spec}})


def _rendered(**values: Any) -> list[dict[str, Any]]:
    return helm_render.render_chart(CHART, values=values)


# --- schemas -------------------------------------------------------------------------------


def test_every_plain_manifest_validates() -> None:
    docs = _manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service",
                                         "PodDisruptionBudget", "ServiceMonitor"}
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            _validate(doc)


def test_validation_catches_a_wrong_field() -> None:
    """The validator is strict: a misspelt or mistyped field fails (else the above proves
    nothing)."""
    deployment = copy.deepcopy(_one(_manifests(), "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    deployment = copy.deepcopy(_one(_manifests(), "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


@pytest.mark.parametrize("values", [
    {},
    {"serviceMonitor": {"enabled": True}, "extraArgs": ["--log-verbose"],
     "nodeSelector": {"kubernetes.io/arch": "amd64"},
     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                      "effect": "NoSchedule"}]},
    {"modelRepository": {"persistentVolumeClaim": "models"}, "podDisruptionBudget":
     {"enabled": False}, "headlessService": {"enabled": False},
     "prometheusAnnotations": False},
], ids=["defaults", "everything-on", "volume-minimal"])
def test_every_rendered_chart_document_validates(values: dict[str, Any]) -> None:
    docs = _rendered(**values)
    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            _check_service_monitor(doc, docs)
        else:
            _validate(doc)
    _check_selectors(docs)


def _check_service_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """The Prometheus Operator's required fields, and that it finds the metrics port."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    services = [s for s in _by_kind(docs, "Service")
                if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    port_names = {p["name"] for s in services for p in s["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def _check_selectors(docs: list[dict[str, Any]]) -> None:
    """Services, the PDB and the Deployment's own selector all pick the Deployment's pods, and
    the ports they target are the pods' ports."""
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    pod_ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in _by_kind(docs, "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= pod_ports
    for pdb in _by_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_service_monitor_finds_the_metrics_port() -> None:
    docs = _manifests()
    _check_service_monitor(_one(docs, "ServiceMonitor"), docs)


def test_kserve_runtime_and_inference_service() -> None:
    kserve = _kserve()
    runtime, isvc = kserve["ServingRuntime"], kserve["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    spec = runtime["spec"]
    # gRPC only: the HTTP port answers health and metrics, not v2 REST inference, so "v2" would
    # send an InferenceService's REST calls to a port that cannot answer them.
    assert spec["protocolVersions"] == ["grpc-v2"]
    for model_format in spec["supportedModelFormats"]:
        assert set(model_format) <= {"name", "version", "autoSelect", "priority"}
    _validate_containers(spec["containers"])
    (container,) = spec["containers"]
    # KServe routes to the container named kserve-container; gRPC needs its port named h2c.
    assert container["name"] == "kserve-container"
    assert [p["name"] for p in container["ports"]] == ["h2c"]
    assert container["ports"][0]["containerPort"] == _server_defaults().grpc_port

    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] == "grpc-v2"
    # KServe turns the runtime's prometheus.kserve.io/* annotations into scrape settings only
    # when the InferenceService asks for it.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == _server_defaults().metrics_port
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    # The predictor's pod-level fields are a PodSpec's.
    pod_fields = {k: v for k, v in predictor.items()
                  if k not in {"model", "minReplicas", "maxReplicas"}}
    _validate_containers([{"name": "check", "image": "check"}], **pod_fields)


# --- the chart against the plain manifests -------------------------------------------------


def _keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_chart_renders_the_plain_manifests() -> None:
    """``helm template pagedserve`` with the default values gives exactly deploy/kubernetes/
    (the ServiceMonitor once enabled), so the two never drift apart."""
    plain = _keyed(_manifests())
    rendered = _keyed(_rendered(serviceMonitor={"enabled": True}))
    assert rendered.keys() == plain.keys()
    for key, doc in plain.items():
        assert rendered[key] == doc, key
    assert ("ServiceMonitor", "pagedserve") not in _keyed(_rendered())


def test_chart_values_take_effect() -> None:
    docs = helm_render.render_chart(CHART, release="llm", values={
        "replicaCount": 5, "image": {"tag": "1.2.3"}, "extraArgs": ["--log-verbose"],
        "modelRepository": {"persistentVolumeClaim": "models"}})
    keyed = _keyed(docs)
    assert ("ConfigMap", "llm-model-repository") not in keyed
    deployment = keyed[("Deployment", "llm")]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 5
    assert container["image"] == "registry.example.com/pagedserve:1.2.3"
    assert container["args"][-1] == "--log-verbose"
    assert spec["volumes"] == [{"name": "model-repository", "persistentVolumeClaim":
                                {"claimName": "models", "readOnly": True}}]
    assert {("Service", "llm"), ("Service", "llm-headless"),
            ("PodDisruptionBudget", "llm")} <= keyed.keys()


def test_renderer_command_prints_what_helm_template_prints() -> None:
    out = subprocess.run([sys.executable, str(DEPLOY / "helm" / "render.py"), str(CHART), "llm"],
                         capture_output=True, text=True, check=True).stdout
    assert "# Source: pagedserve/templates/deployment.yaml" in out
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    assert docs == helm_render.render_chart(CHART, release="llm")


def test_renderer_refuses_what_it_does_not_render() -> None:
    with pytest.raises(helm_render.TemplateError, match="include"):
        helm_render.render_template('{{ include "x" . }}', {})
    with pytest.raises(helm_render.TemplateError, match="no value"):
        helm_render.render_template("{{ .Values.missing }}", {"Values": {}})
    with pytest.raises(helm_render.TemplateError, match="not closed"):
        helm_render.render_template("{{ if .a }}x", {"a": 1})
    text = helm_render.render_template(
        "a:\n{{- range .xs }}\n  - {{ . | quote }}\n{{- end }}\n{{- if not .b }} none{{ else }}"
        " some{{ end }}", {"xs": ["p", 2], "b": ""})
    assert text == 'a:\n  - "p"\n  - "2" none'


@pytest.mark.skipif(shutil.which("helm") is None, reason="no helm binary")
def test_helm_renders_as_our_renderer_does() -> None:
    out = subprocess.run(["helm", "template", "pagedserve", str(CHART), "--set",
                          "serviceMonitor.enabled=true"], capture_output=True, text=True,
                         check=True).stdout
    helm_docs = [doc for doc in yaml.safe_load_all(out) if doc]
    assert _keyed(helm_docs) == _keyed(_rendered(serviceMonitor={"enabled": True}))


# --- the model repository the pods see -----------------------------------------------------


def _mount_config_map(config_map: dict[str, Any], items: list[dict[str, str]],
                      target: Path) -> None:
    """Lays out a ConfigMap volume as the kubelet does: files in a timestamped folder, its
    top-level entries reached through the ``..data`` symlink."""
    data = target / "..2026_01_01_00_00_00.000000000"
    for item in items:
        path = data / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_map["data"][item["key"]])
    (target / "..data").symlink_to(data.name)
    for top in {Path(item["path"]).parts[0] for item in items}:
        (target / top).symlink_to(Path("..data") / top)


def _repository_view(root: Path) -> dict[str, Any]:
    """What the server reads of a repository: its models, their configs and engine settings."""
    view = {}
    for name in model_names(root):
        config = load_config(root / name)
        versions = sorted(p.name for p in (root / name).iterdir() if p.name.isdigit())
        view[name] = (str(config), {v: engine_config(config, root / name / v) for v in versions})
    return view


@pytest.mark.parametrize("source", ["plain", "chart"])
def test_mounted_config_map_is_the_model_repository(source: str, tmp_path: Path) -> None:
    docs = _manifests() if source == "plain" else _rendered()
    config_map = _one(docs, "ConfigMap")
    (volume,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    _mount_config_map(config_map, volume["configMap"]["items"], tmp_path)
    repo_files = sorted(str(p.relative_to(REPOSITORY)) for p in REPOSITORY.rglob("*")
                        if p.is_file() and p.name != "README.md")
    assert sorted(i["path"] for i in volume["configMap"]["items"]) == repo_files
    for item in volume["configMap"]["items"]:
        assert config_map["data"][item["key"]] == (REPOSITORY / item["path"]).read_text()
    view = _repository_view(tmp_path)
    assert view and view == _repository_view(REPOSITORY)


# --- ports, probes and the graceful rollout ------------------------------------------------


def _flag(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name:
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _grace(args: list[str]) -> float:
    """The server's --grace-period as these arguments set it, else the parser's default."""
    value = _flag(args, "--grace-period")
    return float(value) if value is not None else float(_server_defaults().grace_period)


def _pre_stop_seconds(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return float(command[1])


def _deployments() -> dict[str, dict[str, Any]]:
    return {"plain": _one(_manifests(), "Deployment"), "chart": _one(_rendered(), "Deployment")}


def _shutdown_seconds() -> float:
    """The server's bounds after its grace period (backend/server/app.py): the cut streams'
    last writes, then stopping the servers, the engines and the trace export."""
    return float(server_app.CUT_WRITE_SECONDS) + float(server_app.STOP_SECONDS)


@pytest.mark.parametrize("source", ["plain", "chart", "kserve"])
def test_termination_covers_pre_stop_grace_period_and_shutdown(source: str) -> None:
    if source == "kserve":
        kserve = _kserve()
        (container,) = kserve["ServingRuntime"]["spec"]["containers"]
        termination = kserve["InferenceService"]["spec"]["predictor"][
            "terminationGracePeriodSeconds"]
    else:
        pod = _deployments()[source]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        termination = pod["terminationGracePeriodSeconds"]
    grace = _grace(container["args"])
    needed = _pre_stop_seconds(container) + grace + _shutdown_seconds() + EXIT_MARGIN
    assert termination >= needed, f"{termination} s < {needed} s: SIGKILL before the exit"
    assert grace == _grace(_containerfile_cmd()), "the image and the pods drain alike"


@pytest.mark.parametrize("source", ["plain", "chart", "kserve"])
def test_probes_and_ports_are_the_servers(source: str) -> None:
    defaults = _server_defaults()
    if source == "kserve":
        (container,) = _kserve()["ServingRuntime"]["spec"]["containers"]
        http_port: int | str = defaults.http_port
    else:
        (container,) = _deployments()[source]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port,
                         "metrics": defaults.metrics_port}
        http_port = "http"
    assert _flag(container["args"], "--model-repository") == "/models"
    probes = {name: container[name]["httpGet"] for name in
              ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/v2/health/live", "port": http_port}
    assert probes["readinessProbe"] == {"path": "/v2/health/ready", "port": http_port}
    assert probes["startupProbe"] == {"path": "/v2/health/ready", "port": http_port}
    assert container["resources"]["requests"]


def test_pods_are_scraped_and_disruptions_bounded() -> None:
    docs = _manifests()
    deployment = _one(docs, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _server_defaults().metrics_port
    assert deployment["spec"]["replicas"] > 1
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# --- the container recipe ------------------------------------------------------------------


def _containerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [tuple(line.split(None, 1)) for line in lines if line and line[0] != "#"]
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return [(word, rest) for word, rest in instructions[last_from:]]


def _containerfile_cmd() -> list[str]:
    (cmd,) = [json.loads(rest) for word, rest in _containerfile_instructions() if word == "CMD"]
    return list(cmd)


def test_containerfile_runs_unprivileged_with_a_health_check() -> None:
    final = dict(_containerfile_instructions())
    assert final["USER"].split(":")[0] not in {"0", "root"}
    assert set(final["EXPOSE"].split()) == {"8000", "8001", "8002"}
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert "/v2/health/ready" in final["HEALTHCHECK"]
    assert json.loads(final["ENTRYPOINT"]) == ["pagedserve", "serve"]
    assert "--grace-period" in _containerfile_cmd()


def _pip_setting(env: str, key: str) -> str | None:
    """A pip setting of this machine, from its environment variable or pip's configuration."""
    if os.environ.get(env):
        return os.environ[env]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", key],
                         capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def _build_args() -> list[str]:
    """What this machine's pip needs inside the build too: its wheel folders (torch's CPU
    build lies there, where the PyTorch index cannot be reached) and its CA bundle."""
    args = []
    links = _pip_setting("PIP_FIND_LINKS", "global.find-links") or ""
    folders = [f for f in links.split() if Path(f).is_dir()]
    torch = [f for f in folders if any(Path(f).glob("torch-2.13.0+cpu-*.whl"))]
    if torch:
        args += ["-v", f"{torch[0]}:/wheels:ro", "--build-arg", "TORCH_INDEX_URL="]
    cert = _pip_setting("PIP_CERT", "global.cert")
    if cert and Path(cert).is_file():
        args += ["-v", f"{cert}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    return args


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """deploy/Containerfile built with podman on the base image deploy/base-image.sh makes."""
    base = subprocess.run(["bash", str(DEPLOY / "base-image.sh")], capture_output=True,
                          text=True, timeout=900)
    assert base.returncode == 0, base.stderr[-4000:]
    tag = f"localhost/pagedserve-test:{uuid.uuid4().hex[:12]}"
    build = subprocess.run(
        ["podman", "build", "--isolation", "chroot", "--format", "docker", "--layers=false",
         "-f", str(CONTAINERFILE), "-t", tag, "--build-arg",
         f"BASE_IMAGE={base.stdout.strip().splitlines()[-1]}", *_build_args(), str(ROOT)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S - 300)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    try:
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "--force", tag], capture_output=True)


def _inspect(tag: str) -> dict[str, Any]:
    out = subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out)[0])


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_image_builds_with_the_recipes_settings(image: str) -> None:
    inspected = _inspect(image)
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    assert "/v2/health/ready" in " ".join(inspected["Healthcheck"]["Test"])
    assert config["Entrypoint"] == ["pagedserve", "serve"]
    assert config["Cmd"] == _containerfile_cmd()


@pytest.fixture
def container_root(image: str) -> Iterator[Path]:
    """The image's file system, writable, as a created (never started) container's, with
    /proc mounted."""
    name = f"pagedserve-test-{uuid.uuid4().hex[:12]}"
    subprocess.run(["podman", "create", "--name", name, image], capture_output=True, text=True,
                   check=True)
    try:
        root = Path(subprocess.run(["podman", "mount", name], capture_output=True, text=True,
                                   check=True).stdout.strip())
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root / "proc")], check=True)
    finally:
        subprocess.run(["podman", "umount", name], capture_output=True)
        subprocess.run(["podman", "rm", "--force", name], capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _generate(grpc_port: int, prompt: str, max_tokens: int) -> str:
    """One greedy request over the decoupled stream, through the official client."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, llm_inputs(prompt, max_tokens, stream=False,
                                                    exclude_input_in_output=True))
        text = ""
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            text += text_of(result)
            if is_final(result):
                return text
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot --userspec into the image's "
                    "file system and mount -t proc there")
def test_image_serves_and_drains(container_root: Path, image: str, tmp_path: Path,
                                 smollm: Any, hf_smollm: Any) -> None:
    """The image's own entry point and settings, run from its file system (podman run does
    not work on these machines): its health check fails until the server is ready, then
    passes; it answers as transformers does; SIGTERM ends it with status 0."""
    inspected = _inspect(image)
    config = inspected["Config"]
    user = config["User"]
    env = [*config["Env"], f"HOME={config['WorkingDir']}"]
    http_port, grpc_port = _free_port(), _free_port()
    # The health check probes port 8000; this server listens on a free port instead.
    health = [part.replace(":8000/", f":{http_port}/")
              for part in inspected["Healthcheck"]["Test"][1:]]
    command = [*config["Entrypoint"], *config["Cmd"], "--host", "127.0.0.1",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port),
               "--metrics-port", "0"]

    def in_image(*argv: str) -> list[str]:
        return ["chroot", f"--userspec={user}", str(container_root), "/usr/bin/env", "-i",
                *env, *argv]

    def health_check() -> int:
        return subprocess.run(in_image(*health), capture_output=True, timeout=30).returncode

    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(in_image(*command), stdout=out, stderr=subprocess.STDOUT)
    try:
        assert health_check() != 0
        deadline = time.monotonic() + 300
        while not _ready(http_port):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not ready after 300 s:\n" + log.read_text()
            time.sleep(0.2)
        assert health_check() == 0

        prompt = "The capital of France is"
        ids = hf_greedy(hf_smollm, smollm.tokenizer(prompt).input_ids, 8)
        expected = smollm.tokenizer.decode(ids, skip_special_tokens=True)
        assert _generate(grpc_port, prompt, 8) == expected

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()
        assert health_check() != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
