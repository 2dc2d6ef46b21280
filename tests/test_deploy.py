"""The recipes in deploy/ (see docs/deploying.md), tried as far as one machine allows.

No cluster here: the Kubernetes manifests are parsed and checked for consistency,
and the containers' own commands and environment are run as local processes; the
systemd units' ExecStart lines are run with their EnvironmentFile. (Slurm's
recipes run on a real cluster: tests/test_deploy_slurm.py.) Addresses that name the cluster
(a Service name, a head node, every interface) are pointed at loopback, and
nothing else is changed.
"""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, kill_tree, wait_for

from fade.status import query

yaml = pytest.importorskip("yaml", reason="pyyaml (in the test extra) reads the manifests")
tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads pyproject.toml")

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def argv(command: list[str]) -> list[str]:
    """A console script's command line, run with this interpreter (``fade-x`` -> ``-m``)."""
    name = Path(command[0]).name
    module = SCRIPTS[name].split(":")[0]
    return [sys.executable, "-m", module, *command[1:]]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            kill_tree(process.pid)
            process.wait()


def run_pool_job(address: str, workers: int) -> None:
    """Wait for the workers to register, then run tasks through the pool."""
    wait_for(lambda: len(query(address)["workers"]) == workers, 30, f"{workers} workers")
    job = (
        "import fade, sys\n"
        "with fade.Executor(sys.argv[1]) as ex:\n"
        "    print(sum(ex.map(abs, range(-50, 50))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", job, address], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "2500", out.stderr


# -- Kubernetes -------------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = spec
    return result


def test_kubernetes_manifests_fit_together() -> None:
    docs = manifests()
    broker, workers = docs["Deployment", "fade-broker"], docs["Deployment", "fade-worker"]
    service = docs["Service", "fade-broker"]
    for deployment in (broker, workers):
        spec = deployment["spec"]
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )
    assert broker["spec"]["replicas"] == 1 and broker["spec"]["strategy"]["type"] == "Recreate"
    # The Service selects the broker pod and forwards to its named ports.
    assert (
        service["spec"]["selector"].items()
        <= broker["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["name"]: p["containerPort"] for p in container(broker)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} <= ports.keys()
    # Workers find the broker by the Service's name and port, through FADE_ADDRESS alone.
    env = {e["name"]: e["value"] for e in container(workers)["env"]}
    assert (
        env["FADE_ADDRESS"]
        == f"tcp://{service['metadata']['name']}:{service_ports['fade']['port']}"
    )
    assert not any(a.startswith("tcp://") for a in container(workers)["args"])
    # Probes and Prometheus point at the HTTP endpoint the broker's args turn on.
    http = container(broker)["args"][container(broker)["args"].index("--http") + 1]
    assert http.endswith(f":{ports['http']}")
    assert container(broker)["readinessProbe"]["httpGet"]["path"] == "/status"
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
    policy = docs["NetworkPolicy", "fade-broker"]
    assert policy["spec"]["podSelector"]["matchLabels"] == broker["spec"]["selector"]["matchLabels"]


def test_kubernetes_containers_run_as_a_pool(processes: list[subprocess.Popen[bytes]]) -> None:
    docs = manifests()
    broker = container(docs["Deployment", "fade-broker"])
    worker = container(docs["Deployment", "fade-worker"])
    port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"

    def environment(spec: dict[str, Any]) -> dict[str, str]:
        env = {e["name"]: e["value"] for e in spec["env"]}
        assert set(env) == {"FADE_ADDRESS"}
        return {**os.environ, "FADE_ADDRESS": address}  # the cluster's address, made local

    # The pod's all-interfaces HTTP address, made local; every other argument as written.
    broker_args = [a.replace("0.0.0.0:8787", f"127.0.0.1:{http_port}") for a in broker["args"]]
    processes.append(
        subprocess.Popen(argv(broker["command"] + broker_args), env=environment(broker))
    )
    processes.append(
        subprocess.Popen(argv(worker["command"] + worker["args"]), env=environment(worker))
    )
    processes_per_pod = int(worker["args"][worker["args"].index("--processes") + 1])
    run_pool_job(address, processes_per_pod)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=10) as probe:
        assert probe.status == 200  # what the readiness probe asks


# -- systemd ---------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name)
    return parser


def env_file() -> dict[str, str]:
    lines = (DEPLOY / "systemd" / "fade.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def exec_start(parser: configparser.ConfigParser, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd expands it: ${VAR} from the environment, then split."""
    line = parser["Service"]["ExecStart"]
    for key, value in env.items():
        line = line.replace("${" + key + "}", value)
    assert "${" not in line, line
    return shlex.split(line)


def test_systemd_units_run_as_a_pool(processes: list[subprocess.Popen[bytes]]) -> None:
    settings = env_file()
    assert set(settings) == {"FADE_ADDRESS", "FADE_PROCESSES"}
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**settings, "FADE_ADDRESS": address}  # the head node's name, made local
    broker, worker = unit("fade-broker.service"), unit("fade-worker.service")
    for parsed in (broker, worker):
        assert parsed["Service"]["EnvironmentFile"] == "/etc/fade/fade.env"
    # Workers drain on SIGTERM: only their supervisor may get it from systemd.
    assert worker["Service"]["KillMode"] == "mixed"
    http_port = free_port()
    broker_cmd = [
        a.replace("127.0.0.1:8787", f"127.0.0.1:{http_port}") for a in exec_start(broker, env)
    ]
    processes.append(subprocess.Popen(argv(broker_cmd), env={**os.environ, **env}))
    processes.append(subprocess.Popen(argv(exec_start(worker, env)), env={**os.environ, **env}))
    run_pool_job(address, int(settings["FADE_PROCESSES"]))
