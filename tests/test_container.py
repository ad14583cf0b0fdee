"""The server image, built with podman by .ci/image, run the way the Helm chart and the README run it.

The chart's server container is rendered (helm's Go SDK, as in test_helm.py) and translated into `podman run`
options: its user, groups, read-only root, dropped capabilities, the ConfigMap's SAM2SERVE_* environment,
its ports, command and volume mounts, with engines exported on the host by root (untrained weights) in the
engine volume, mounted read-only. Through the published ports: grpc.health.v1 SERVING on the probes' port,
GetInfo, one AutoSegment, /metrics; inside: uid, read-only root; then SIGTERM drains a job in flight and
the container exits 0. In CI (CI=true) a missing podman is a failure, elsewhere a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import TINY, needs_export_tools, require
from grpc_harness import quick_request
from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc

pytestmark = needs_export_tools  # the engines are exported on the host, as the other tests do

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/sam2serve:ci"
STATE = Path(os.environ.get("SAM2SERVE_IMAGE_STATE", "/var/cache/sam2serve-image"))  # .ci/image's
README_RUN = ('docker run --rm -p 50051:50051 -p 9090:9090 --read-only --tmpfs /tmp \\\n'
              '  -v "$PWD/engines/sam2.1_hiera_tiny:/engines/sam2.1_hiera_tiny:ro" sam2serve:0.1.0')
Health = health_pb2.HealthCheckResponse


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(STATE / "containers.conf")}  # .ci/image's ulimits and runtime
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    """Builds the base (once; cached by its recipe) and the server image, as CI and a developer would."""
    for tool in ("podman", "mmdebstrap"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (.ci/setup installs it when run as root)")
    require(os.geteuid() == 0, "building and running the image needs root (rootful podman)")
    result = subprocess.run(["bash", str(ROOT / ".ci" / "image")], env={**os.environ, "IMAGE": IMAGE},
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f".ci/image failed:\n{result.stdout}\n{result.stderr}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:  # build times and sizes in the CI log
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + result.stdout.strip())
    return IMAGE


def render_server(values: dict | None = None) -> dict:
    """The chart's render: the pod spec, its server container and the ConfigMap's environment."""
    try:
        import helm_python
        import yaml
    except ImportError as e:
        require(False, f"rendering the chart needs helm-python-sdk and PyYAML (the dev extra): {e}")
    with helm_python.Chart.load(ROOT / "helm" / "sam2serve") as chart:
        rendered = chart.render(values, name="demo", namespace="ml")
    objects = {(d["kind"], d["metadata"]["name"]): d for path, text in rendered.items()
               if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d}
    pod = objects[("Deployment", "demo-sam2serve")]["spec"]["template"]["spec"]
    [server] = [c for c in pod["containers"] if c["name"] == "sam2serve"]
    scripts = objects.get(("ConfigMap", "demo-sam2serve-scripts"), {}).get("data", {})
    return {"pod": pod, "container": server, "env": objects[("ConfigMap", "demo-sam2serve")]["data"],
            "scripts": scripts}


@pytest.fixture(scope="module")
def chart_defaults() -> dict:
    return render_server()


@pytest.fixture(scope="module")
def engine_volume(tiny_engine_dir, tmp_path_factory) -> Path:
    """What the chart's engine volume holds: <model>/ as `sam2serve export` (here by root) left it.

    Hard links keep the export's own modes, which are what the defect was about: a 0700 root directory.
    """
    volume = tmp_path_factory.mktemp("engine-volume")
    volume.chmod(0o755)  # the volume's root, as an emptyDir or a PVC gives it
    shutil.copytree(tiny_engine_dir, volume / TINY, copy_function=os.link)
    return volume


TRANSLATED = {"name", "image", "imagePullPolicy", "command", "args", "ports", "env", "envFrom", "securityContext",
              "volumeMounts", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "resources"}


def podman_run_options(pod: dict, container: dict, env: dict[str, str], volumes: dict[str, Path]) -> list[str]:
    """`podman run` options for a pod's container, for the fields the chart sets (others fail the test).

    Probes, preStop and resources are the kubelet's business and are checked through the published ports.
    """
    assert set(container) <= TRANSLATED, f"untranslated container fields: {set(container) - TRANSLATED}"
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    options = ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    if "fsGroup" in security:
        options += ["--group-add", str(security["fsGroup"])]
    if security.get("readOnlyRootFilesystem"):
        options += ["--read-only", "--read-only-tmpfs=false"]  # only the volumes the pod mounts are writable
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    for cap in security.get("capabilities", {}).get("drop", []):
        options += ["--cap-drop", cap]
    pod_volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = pod_volumes[mount["name"]]
        if mount["name"] in volumes:
            source = volumes[mount["name"]] / mount.get("subPath", "")
            options += ["-v", f"{source}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
        else:
            assert "emptyDir" in volume, f"volume {mount['name']} needs a host directory"
            assert not mount.get("readOnly")
            options += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-mode=1777"]
    environment = dict(env)
    for entry in container.get("env", []):
        assert "value" in entry, f"env {entry['name']} comes from a Secret; give it a value here"
        environment[entry["name"]] = entry["value"]
    for name, value in sorted(environment.items()):
        options += ["-e", f"{name}={value}"]
    for port in container.get("ports", []):
        options += ["-p", f"127.0.0.1::{port['containerPort']}"]
    options += ["--entrypoint", json.dumps(container["command"])]
    return options


@contextlib.contextmanager
def running(options: list[str], image: str, args: list[str] | None = None) -> Iterator[str]:
    name = f"sam2serve-test-{secrets.token_hex(4)}"
    podman("run", "-d", "--pull=never", "--name", name, *options, image, *(args or []))
    try:
        yield name
    except BaseException:
        logs = podman("logs", name, check=False)
        print(f"--- podman logs {name}:\n{logs.stdout[-5000:]}{logs.stderr[-5000:]}")
        raise
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def host_port(name: str, container_port: int) -> int:
    published = podman("port", name, f"{container_port}/tcp").stdout.strip().splitlines()[0]
    return int(published.rsplit(":", 1)[1])


def wait_until_serving(name: str, channel: grpc.Channel, service: str = "", timeout: float = 300) -> None:
    """Health checks until SERVING; each waits for the port (wait_for_ready), and a dead container ends it."""
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(int(timeout / 5)):
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5, wait_for_ready=True)
            if status.status == Health.SERVING:
                return
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise
        state = podman("container", "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"the container is {state}"
    raise AssertionError(f"not SERVING after {timeout} s")


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def process_ids(name: str) -> dict[str, list[str]]:
    """Uid/Gid/Groups of the container's PID 1 (the server), from /proc."""
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    return {k: v.split() for k, v in re.findall(r"^(Uid|Gid|Groups):\s*(.*)$", status, re.M)}


def cannot_write(name: str, path: str) -> str:
    result = podman("exec", name, "sh", "-c", f"touch {path}", check=False)
    assert result.returncode != 0, f"{path} is writable"
    return result.stderr


def test_every_variable_the_chart_names_is_a_server_setting():
    """SAM2SERVE_* in the chart's templates, values and READMEs: each one is a flag of `sam2serve serve`."""
    from dataclasses import fields

    from sam2serve.config import ServerConfig

    settings = {f"SAM2SERVE_{f.name.upper()}" for f in fields(ServerConfig)}
    named = {m for path in (ROOT / "helm").rglob("*") if path.is_file()
             for m in re.findall(r"SAM2SERVE_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    assert {"SAM2SERVE_ENGINES", "SAM2SERVE_PORT", "SAM2SERVE_API_KEY", "SAM2SERVE_REDIS_URL"} <= named
    assert named <= settings, f"the chart names variables the server ignores: {sorted(named - settings)}"


def test_image_defaults_agree_with_the_chart(image, chart_defaults):
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    pod, server, env = chart_defaults["pod"], chart_defaults["container"], chart_defaults["env"]
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert config["User"] == f"{uid}:{gid}"
    assert server["securityContext"]["runAsUser"] == uid
    assert config["Entrypoint"] == server["command"]
    exposed = set(config["ExposedPorts"])
    assert {f"{p['containerPort']}/tcp" for p in server["ports"]} <= exposed
    with_http = render_server({"server": {"http": {"enabled": True}}})["container"]
    assert exposed == {f"{p['containerPort']}/tcp" for p in with_http["ports"]}, "fal's HTTP port as the chart's"
    image_env = dict(e.split("=", 1) for e in config["Env"])
    for name in ("SAM2SERVE_ENGINES", "SAM2SERVE_PORT", "SAM2SERVE_METRICS_PORT"):
        assert image_env[name] == env[name], name
    probe_ports = {server[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probe_ports == {int(env["SAM2SERVE_PORT"])}
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/engines", "/tmp"}
    assert env["SAM2SERVE_ENGINES"] == f"/engines/{TINY}"
    assert image_env["HOME"] == "/tmp", "HOME on the one writable path"


def config_line(name: str) -> dict[str, str]:
    """The settings the server printed at start (`sam2serve config: key=value, ...`)."""
    logs = podman("logs", name).stdout
    line = next(x for x in logs.splitlines() if x.startswith("sam2serve config: "))
    return dict(item.split("=", 1) for item in line.removeprefix("sam2serve config: ").split(", "))


def test_serves_as_the_chart_runs_it(image, engine_volume):
    # the drain covers a job on a loaded 2-core machine; the value travels through the chart's ConfigMap
    chart = render_server({"server": {"drainSeconds": 120, "workers": 1, "queueSize": 8,
                                      "providers": "CPUExecutionProvider"}})
    pod, server, env = chart["pod"], chart["container"], chart["env"]
    assert env["SAM2SERVE_DRAIN_SECONDS"] == "120"
    options = podman_run_options(pod, server, env, {"engines": engine_volume})
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    with running(options, image) as name:
        grpc_port, metrics_port = host_port(name, ports["grpc"]), host_port(name, ports["metrics"])
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
            ("grpc.max_receive_message_length", 256 << 20)])
        probe = server["readinessProbe"]["grpc"]
        assert probe["port"] == ports["grpc"]
        wait_until_serving(name, channel, probe.get("service", ""))
        stub = pb_grpc.AutoSegmentServiceStub(channel)

        # every SAM2SERVE_* variable the chart sets is a setting the server took, with the chart's value
        settings = config_line(name)
        for variable, value in env.items():
            key = variable.removeprefix("SAM2SERVE_").lower()
            assert key in settings, f"the server has no setting for the chart's {variable}"
            assert settings[key] == value or float(settings[key]) == float(value), (variable, settings[key])

        info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        assert info.model.name == TINY and info.model.untrained and info.warning

        result = stub.AutoSegment(quick_request(), timeout=300)
        assert result.total_masks >= 1 and result.combined_mask.data

        scraped = metrics(metrics_port)
        assert sample(scraped, "sam2serve_requests_total", rpc="AutoSegment", code="OK") == 1
        assert sample(scraped, "sam2serve_untrained_weights") == 1

        ids = process_ids(name)
        uid, gid, fs_group = (str(pod["securityContext"][k]) for k in ("runAsUser", "runAsGroup", "fsGroup"))
        assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid] * 4 and fs_group in ids["Groups"]
        assert uid != "0"
        assert "Read-only file system" in cannot_write(name, "/opt/venv/probe")
        assert "Read-only file system" in cannot_write(name, f"/engines/{TINY}/probe")
        podman("exec", name, "sh", "-c", "touch /tmp/probe && rm /tmp/probe")  # the one writable path
        inspected = json.loads(podman("container", "inspect", name).stdout)[0]
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True

        # SIGTERM (what the kubelet sends after preStop): NOT_SERVING, new work refused, the job in flight ends
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == Health.SERVING
        stream = stub.Subscribe(quick_request(), timeout=300)
        assert next(stream).WhichOneof("event") == "status"  # accepted
        events: list = []

        def read() -> None:
            try:
                events.extend(stream)
            except grpc.RpcError as e:
                events.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        podman("kill", "--signal", "TERM", name)
        assert next(watch).status == Health.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Submit(quick_request(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        reader.join(300)
        assert events and isinstance(events[-1], pb.SubscribeEvent), events[-1:]
        assert events[-1].WhichOneof("event") == "result" and events[-1].result.total_masks >= 1
        exit_code = podman("wait", name, timeout=int(env["SAM2SERVE_DRAIN_SECONDS"]) + 60).stdout.strip()
        assert exit_code == "0"
        channel.close()


def test_runs_as_the_readme_says(image, engine_volume):
    """The documented `docker run --read-only --tmpfs /tmp -v <export>:/engines/<model>:ro`, image defaults."""
    def words(text: str) -> str:  # shell words, whatever the line breaks and comment marks
        return " ".join(re.sub(r"[#\\]", " ", text).split())

    for doc in ("README.md", "Dockerfile"):
        assert words(README_RUN) in words((ROOT / doc).read_text()), f"{doc} documents another command"
    options = ["--read-only", "--tmpfs", "/tmp", "-v", f"{engine_volume / TINY}:/engines/{TINY}:ro",
               "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9090"]
    with running(options, image) as name:
        channel = grpc.insecure_channel(f"127.0.0.1:{host_port(name, 50051)}")
        wait_until_serving(name, channel)
        assert pb_grpc.AutoSegmentServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30).model.name == TINY
        assert "sam2serve_build_info" in metrics(host_port(name, 9090))
        assert process_ids(name)["Uid"] == ["10001"] * 4
        podman("kill", "--signal", "TERM", name)
        assert podman("wait", name, timeout=120).stdout.strip() == "0"
        channel.close()


@pytest.mark.skipif(not os.environ.get("SAM2SERVE_EXPORT_IMAGE"), reason=(
    "opt-in: SAM2SERVE_EXPORT_IMAGE=<the export target> (torch, ~6 GB; `bash .ci/image --export`, README)"))
def test_export_image_runs_as_the_chart_init_container(image, tmp_path):
    """The chart's pod, start to end: its export-engines init container (the export image, untrained
    weights) writes the engines into the engine volume as uid 10001; the server then serves them."""
    chart = render_server({"engines": {"export": {"weights": "untrained"}}})
    pod = chart["pod"]
    [init] = pod["initContainers"]
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, text in chart["scripts"].items():
        (scripts / name).write_text(text)
    scripts.chmod(0o755)
    volume = tmp_path / "engine-volume"
    volume.mkdir()
    volume.chmod(0o777)  # an emptyDir
    options = podman_run_options(pod, init, chart["env"], {"engines": volume, "scripts": scripts})
    export_image = os.environ["SAM2SERVE_EXPORT_IMAGE"]
    with running(options, export_image) as name:
        assert podman("wait", name, timeout=1800).stdout.strip() == "0", podman("logs", name).stderr[-3000:]
    model_dir = volume / TINY
    assert model_dir.stat().st_uid == pod["securityContext"]["runAsUser"]
    assert json.loads((model_dir / "manifest.json").read_text())["weights"]["origin"] == "untrained"

    server = chart["container"]
    options = podman_run_options(pod, server, chart["env"], {"engines": volume})
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    with running(options, image) as name:
        channel = grpc.insecure_channel(f"127.0.0.1:{host_port(name, ports['grpc'])}")
        wait_until_serving(name, channel)
        stub = pb_grpc.AutoSegmentServiceStub(channel)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).model.untrained
        assert stub.AutoSegment(quick_request(), timeout=300).total_masks >= 1
        channel.close()
