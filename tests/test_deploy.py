"""The Kubernetes and systemd recipes in deploy/ (see docs/deploying.md), as far as one
machine allows. (SSH and Slurm run for real: tests/test_deploy_ssh.py and
tests/test_deploy_slurm.py.)

No cluster and no systemd here:

* Kubernetes: the manifests are rendered with ``kubectl kustomize`` (as ``kubectl
  apply -k`` would), validated against the Kubernetes JSON schema (the
  ``kubernetes-validate`` package, offline), and checked to fit together. The
  Secrets are made with the docs' own ``kubectl create secret`` commands (client
  side only), laid out in a folder as the kubelet mounts them, and the
  containers' commands run as local processes with those files.
* systemd: ``systemd-analyze verify`` checks the units in a root folder that holds
  them, fade's commands and systemd's own units; their ExecStart lines then run
  with their EnvironmentFile, Environment and LoadCredential, as systemd would
  set them up, under that root folder.

Addresses that name the cluster (a Service name, a head node, every interface) are
pointed at loopback, and paths at the folder that stands in for the pod's or the
host's file system; nothing else is changed.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tasks
from conftest import INTERVAL, LIVENESS, Pool, free_port, kill_tree, unavailable, wait_for
from deployment import BIN, environ, fade_keys, make_pool_keys, run_job

import fade
from fade.status import query

yaml = pytest.importorskip("yaml", reason="pyyaml (in the test extra) reads the manifests")

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploying.md"
#: Kubernetes versions whose schemas the manifests must satisfy (strict: no unknown field).
K8S_VERSIONS = ("1.27", "1.33")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            kill_tree(process.pid)
            process.wait()


def mapped(value: str, root: Path, prefixes: tuple[str, ...]) -> str:
    """A path inside the pod or host, moved under ``root``; any other value unchanged."""
    for prefix in prefixes:
        if value == prefix or value.startswith(prefix + "/"):
            return str(root) + value
    return value


# -- Kubernetes -------------------------------------------------------------------------


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        unavailable(
            "kubectl",
            "kubectl not installed: Debian's kubernetes-client package brings it "
            "(.ci/run installs it where no kubectl is present)",
        )
    return found


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder``: the resources ``kubectl apply -k`` would send."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (spec,) = pod(deployment)["containers"]
    result: dict[str, Any] = spec
    return result


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", [])}


def secret_mounts(deployment: dict[str, Any]) -> dict[str, str]:
    """mountPath -> name of the Secret mounted there."""
    volumes = {v["name"]: v for v in pod(deployment).get("volumes", [])}
    return {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in container(deployment).get("volumeMounts", [])
        if "secret" in volumes[m["name"]]
    }


def secret_commands() -> list[str]:
    """The ``kubectl create secret`` lines of docs/deploying.md, in order."""
    lines = [line.strip() for line in DOCS.read_text().splitlines()]
    commands = [line for line in lines if line.startswith("kubectl create secret generic")]
    assert commands, "docs/deploying.md shows no kubectl create secret command"
    return commands


def make_secrets(folder: Path) -> dict[str, dict[str, Any]]:
    """The Secrets, made by the docs' commands (client side only: ``--dry-run=client -o
    yaml``) in ``folder``, where the keys are: pool/, worker.key, alice.key."""
    secrets = {}
    for command in secret_commands():
        argv = [kubectl(), *command.split()[1:], "--dry-run=client", "-o", "yaml"]
        out = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{command}: {out.stderr}"
        secret = yaml.safe_load(out.stdout)
        secrets[secret["metadata"]["name"]] = secret
    return secrets


def make_keys(folder: Path) -> None:
    """The pool's keys as the docs make them for Kubernetes."""
    make_pool_keys(folder / "pool", folder / "worker.key", folder / "alice.key")


def mount_secret(secret: dict[str, Any], target: Path, mode: int) -> None:
    """Write (or update) a Secret volume the way the kubelet does: each key a symlink to
    ``..data/KEY``, ``..data`` a symlink to a timestamped folder, swapped atomically."""
    target.mkdir(parents=True, exist_ok=True)
    stamp = target / time.strftime(f"..%Y_%m_%d_%H_%M_%S.{time.monotonic_ns()}")
    stamp.mkdir()
    files = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    for name, data in files.items():
        (stamp / name).write_bytes(data)
        (stamp / name).chmod(mode)
    old = (target / "..data").resolve() if (target / "..data").exists() else None
    (target / "..data_tmp").symlink_to(stamp.name)
    os.replace(target / "..data_tmp", target / "..data")
    for name in files:
        if not (target / name).is_symlink():
            (target / name).symlink_to(f"..data/{name}")
    for entry in target.iterdir():
        if not entry.name.startswith("..") and entry.is_symlink() and entry.name not in files:
            entry.unlink()
    if old is not None:
        shutil.rmtree(old)


def mount_secrets(
    deployment: dict[str, Any], secrets: dict[str, dict[str, Any]], root: Path
) -> None:
    """The deployment's Secret volumes, laid out under ``root`` as in the pod."""
    volumes = {v["name"]: v["secret"] for v in pod(deployment)["volumes"] if "secret" in v}
    for mount in sorted(container(deployment)["volumeMounts"], key=lambda m: m["mountPath"]):
        volume = volumes[mount["name"]]
        mount_secret(
            secrets[volume["secretName"]],
            root / mount["mountPath"].lstrip("/"),
            volume.get("defaultMode", 0o644),
        )


def test_kubernetes_manifests_validate_against_the_schema() -> None:
    import kubernetes_validate

    docs = kustomize(DEPLOY / "k8s")
    assert {doc["kind"] for doc in docs} == {"Deployment", "Service", "NetworkPolicy"}
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    # The validator is strict: a misspelt field fails (so the loop above can fail).
    broken = by_kind(docs)["Deployment", "fade-worker"]
    pod(broken)["terminationGracePeriod"] = pod(broken).pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kubernetes_manifests_fit_together() -> None:
    docs = by_kind(kustomize(DEPLOY / "k8s"))
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
    env = env_of(container(workers))
    assert (
        env["FADE_ADDRESS"]
        == f"tcp://{service['metadata']['name']}:{service_ports['fade']['port']}"
    )
    assert not any(a.startswith("tcp://") for a in container(workers)["args"])
    # Probes and Prometheus point at the HTTP endpoint the broker's args turn on.
    args = container(broker)["args"]
    assert args[args.index("--http") + 1].endswith(f":{ports['http']}")
    assert container(broker)["readinessProbe"]["httpGet"]["path"] == "/status"
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
    policy = docs["NetworkPolicy", "fade-broker"]
    assert policy["spec"]["podSelector"]["matchLabels"] == broker["spec"]["selector"]["matchLabels"]
    # Keys: the broker binds every interface, so it must have them. Its key folder is
    # the Secret with its pair, the authorised keys' Secrets mounted in it.
    key_dir = args[args.index("--keys") + 1]
    assert secret_mounts(broker) == {
        key_dir: "fade-broker-keys",
        f"{key_dir}/clients": "fade-clients",
        f"{key_dir}/workers": "fade-workers",
    }
    # The workers' FADE_KEYS is the file of the Secret mounted there.
    key_file = Path(env["FADE_KEYS"])
    assert secret_mounts(workers) == {str(key_file.parent): "fade-worker-key"}
    for deployment in (broker, workers):
        assert all(m.get("readOnly") for m in container(deployment)["volumeMounts"])
        # Secret files readable by the pod's group alone, which its user is in.
        security = pod(deployment)["securityContext"]
        assert security["fsGroup"] == security["runAsGroup"] and security["runAsNonRoot"]
        assert {v["secret"]["defaultMode"] for v in pod(deployment)["volumes"]} == {0o440}


def test_kubernetes_secrets_match_the_manifests(tmp_path: Path) -> None:
    """The docs' Secrets are valid, and hold what the pods mount: the broker's pair, the
    authorised keys, and a worker key file named as FADE_KEYS says."""
    import kubernetes_validate

    make_keys(tmp_path)
    secrets = make_secrets(tmp_path)
    for secret in secrets.values():
        kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
    assert set(secrets["fade-broker-keys"]["data"]) == {"broker.key", "broker.key_secret"}
    for role in ("clients", "workers"):
        authorised = {p.name for p in (tmp_path / "pool" / role).iterdir()}
        assert set(secrets[f"fade-{role}"]["data"]) == authorised != set()
    docs = by_kind(kustomize(DEPLOY / "k8s"))
    worker_key = Path(env_of(container(docs["Deployment", "fade-worker"]))["FADE_KEYS"])
    assert set(secrets["fade-worker-key"]["data"]) == {worker_key.name}
    mounted = {
        s for d in docs.values() if d["kind"] == "Deployment" for s in secret_mounts(d).values()
    }
    assert mounted <= secrets.keys()


def test_kubernetes_containers_run_as_a_pool(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The containers' commands, args and env, with the Secrets laid out as the kubelet
    mounts them: a keyed pool whose broker takes a client key added later, through an
    update of the Secret alone."""
    docs = by_kind(kustomize(DEPLOY / "k8s"))
    broker, worker = docs["Deployment", "fade-broker"], docs["Deployment", "fade-worker"]
    make_keys(tmp_path)
    secrets = make_secrets(tmp_path)
    pods = {"broker": tmp_path / "broker-pod", "worker": tmp_path / "worker-pod"}
    mount_secrets(broker, secrets, pods["broker"])
    mount_secrets(worker, secrets, pods["worker"])
    address = f"tcp://127.0.0.1:{free_port()}"
    http_port = free_port()

    def command(deployment: dict[str, Any], root: Path) -> tuple[list[str], dict[str, str]]:
        spec = container(deployment)
        mounts = tuple(m["mountPath"] for m in spec["volumeMounts"])
        argv = [mapped(a, root, mounts) for a in spec["command"] + spec["args"]]
        # The pod's all-interfaces HTTP address and the cluster's broker address, made local.
        argv = [a.replace("0.0.0.0:8787", f"127.0.0.1:{http_port}") for a in argv]
        env = {k: mapped(v, root, mounts) for k, v in env_of(spec).items()}
        return [str(BIN / argv[0]), *argv[1:]], environ({**env, "FADE_ADDRESS": address})

    for deployment, root in ((broker, pods["broker"]), (worker, pods["worker"])):
        argv, env = command(deployment, root)
        processes.append(subprocess.Popen(argv, env=env))
    args = container(worker)["args"]
    processes_per_pod = int(args[args.index("--processes") + 1])
    run_job(address, tmp_path / "alice.key", processes_per_pod)
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=10) as probe:
        assert probe.status == 200  # what the readiness probe asks

    # A client authorised later: the Secret fade-clients is made again and the kubelet
    # updates its files in place; the running broker lets bob in.
    fade_keys(
        "add", "client", "bob", "--dir", str(tmp_path / "pool"), "--out", str(tmp_path / "bob.key")
    )
    updated = make_secrets(tmp_path)["fade-clients"]
    assert set(updated["data"]) == {"alice.key", "bob.key"}
    mount_secret(updated, pods["broker"] / "etc/fade/pool/clients", 0o440)
    run_job(address, tmp_path / "bob.key", processes_per_pod)


def test_kubernetes_overlay_can_generate_the_secrets(tmp_path: Path) -> None:
    """Kustomize-friendly: an overlay that sets a namespace and makes the Secrets with a
    secretGenerator gets every reference to them rewritten to the generated names."""
    make_keys(tmp_path)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    for source, name in (
        (tmp_path / "pool" / "broker.key", "broker.key"),
        (tmp_path / "pool" / "broker.key_secret", "broker.key_secret"),
        (tmp_path / "pool" / "clients" / "alice.key", "alice.key"),
        (tmp_path / "pool" / "workers" / "workers.key", "workers.key"),
        (tmp_path / "worker.key", "worker.key"),
    ):
        shutil.copy(source, overlay / name)
    base = os.path.relpath(DEPLOY / "k8s", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"""\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: science
resources: [{base}]
secretGenerator:
  - {{name: fade-broker-keys, files: [broker.key, broker.key_secret]}}
  - {{name: fade-clients, files: [alice.key]}}
  - {{name: fade-workers, files: [workers.key]}}
  - {{name: fade-worker-key, files: [worker.key]}}
"""
    )
    docs = kustomize(overlay)
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert len(generated) == 4 and all(
        re.fullmatch(r"fade-[a-z-]+-[a-z0-9]{10}", n) for n in generated
    )
    assert {d["metadata"].get("namespace") for d in docs} == {"science"}
    mounted = {
        name for d in docs if d["kind"] == "Deployment" for name in secret_mounts(d).values()
    }
    assert mounted == generated


# -- systemd ---------------------------------------------------------------------------

UNITS = ("fade-broker.service", "fade-worker.service")


Unit = dict[str, dict[str, list[str]]]


def unit(name: str) -> Unit:
    """A unit file's sections: each setting's values, in order (systemd lets a setting
    such as Environment= appear more than once)."""
    sections: Unit = {}
    section: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            section.setdefault(key.strip(), []).append(value.strip())
    return sections


def setting(parsed: Unit, key: str) -> str:
    """A setting that must appear once in [Service]."""
    (value,) = parsed["Service"][key]
    return value


@pytest.fixture
def system_root(tmp_path: Path) -> Path:
    """A root folder laid out as the docs install the units: fade in /opt/fade/bin (small
    launchers of this environment's commands), /etc/fade with fade.env, the pool's key
    folder and a worker key, the units in /etc/systemd/system, and systemd's own units."""
    root = tmp_path / "root"
    (root / "opt/fade/bin").mkdir(parents=True)
    for command in ("fade-broker", "fade-worker", "fade-keys"):
        launcher = root / "opt/fade/bin" / command
        launcher.write_text(f'#!/bin/sh\nexec {BIN / command} "$@"\n')
        launcher.chmod(0o755)
    (root / "etc/fade").mkdir(parents=True)
    shutil.copy(DEPLOY / "systemd" / "fade.env", root / "etc/fade/fade.env")
    make_pool_keys(root / "etc/fade/pool", root / "etc/fade/worker.key", tmp_path / "alice.key")
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(DEPLOY / "systemd" / name, root / "etc/systemd/system" / name)
    for units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
            break
    return root


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        unavailable("systemd", "systemd-analyze not installed (Debian's systemd package)")
    return found


def test_systemd_units_verify(system_root: Path) -> None:
    def verify(*units: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [systemd_analyze(), "verify", f"--root={system_root}", *units],
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = verify(*UNITS)
    # Not a word: systemd warns of an unknown setting or a bad specifier, yet exits 0.
    assert out.returncode == 0 and not out.stdout and not out.stderr, out.stdout + out.stderr
    # The check can fail: a unit whose command is missing does not verify.
    broken = (system_root / "etc/systemd/system/fade-worker.service").read_text()
    (system_root / "etc/systemd/system/fade-broken.service").write_text(
        broken.replace("/opt/fade/bin/fade-worker", "/opt/fade/bin/fade-nothing")
    )
    failed = verify("fade-broken.service")
    assert failed.returncode != 0 and "fade-nothing" in failed.stderr


def exec_start(
    parsed: Unit, name: str, root: Path, env_file: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """ExecStart and the environment, as systemd sets them up for unit ``name`` under
    ``root``: specifiers, Environment=, EnvironmentFile=, LoadCredential= (a copy of the
    file, mode 0400, in the credentials folder %d), CacheDirectory= (%C/NAME)."""
    service = parsed["Service"]
    credentials = root / "run/credentials" / name
    specifiers = {"%d": str(credentials), "%C": str(root / "var/cache"), "%%": "%"}

    def expand(text: str) -> str:
        return re.sub(r"%[dC%]", lambda m: specifiers[m.group()], text)

    for line in service.get("LoadCredential", []):
        ident, source = line.split(":", 1)
        credentials.mkdir(parents=True, exist_ok=True)
        shutil.copy(mapped(source, root, ("/etc/fade",)), credentials / ident)
        (credentials / ident).chmod(0o400)
    for line in service.get("CacheDirectory", []):
        for folder in line.split():
            (root / "var/cache" / folder).mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for assignment in shlex.split(expand(line)):
            key, value = assignment.split("=", 1)
            env[key] = value
    env_path = mapped(setting(parsed, "EnvironmentFile"), root, ("/etc/fade",))
    assert env_path == str(root / "etc/fade/fade.env")
    env.update(env_file)  # EnvironmentFile= wins over Environment=
    line = expand(setting(parsed, "ExecStart"))
    for key, value in env.items():
        line = line.replace("${" + key + "}", value)
    assert "${" not in line and "%" not in line, line
    argv = [mapped(a, root, ("/opt/fade", "/etc/fade")) for a in shlex.split(line)]
    return argv, environ(env)


def read_env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_systemd_units_run_as_a_pool(
    system_root: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    settings = read_env_file(system_root / "etc/fade/fade.env")
    assert set(settings) == {"FADE_ADDRESS", "FADE_PROCESSES"}
    address = f"tcp://127.0.0.1:{free_port()}"
    env_file = {**settings, "FADE_ADDRESS": address}  # the head node's name, made local
    broker, worker = unit("fade-broker.service"), unit("fade-worker.service")
    # Workers drain on SIGTERM: only their supervisor may get it from systemd.
    assert setting(worker, "KillMode") == "mixed"
    http_port = free_port()
    broker_argv, broker_env = exec_start(broker, "fade-broker.service", system_root, env_file)
    assert "--keys" in broker_argv  # it binds what FADE_ADDRESS says: any address, keyed
    broker_argv = [a.replace("127.0.0.1:8787", f"127.0.0.1:{http_port}") for a in broker_argv]
    worker_argv, worker_env = exec_start(worker, "fade-worker.service", system_root, env_file)
    assert (
        Path(worker_env["FADE_KEYS"]).parent == system_root / "run/credentials/fade-worker.service"
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("broker", "worker")}
    processes.append(
        subprocess.Popen(broker_argv, env=broker_env, stderr=logs["broker"].open("wb"))
    )
    processes.append(
        subprocess.Popen(worker_argv, env=worker_env, stderr=logs["worker"].open("wb"))
    )
    run_job(address, tmp_path / "alice.key", int(settings["FADE_PROCESSES"]))
    # The job's code was shipped to the workers, into the cache folder the unit sets.
    assert any((system_root / "var/cache/fade").iterdir())
    # systemctl stop: SIGTERM to the worker's main process alone (KillMode=mixed), then
    # to the broker; both drain or stop and exit 0.
    for process in reversed(processes):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert logs["worker"].read_text().count("left (status 0)") == int(settings["FADE_PROCESSES"])
    assert "fade-broker stopped" in logs["broker"].read_text()


# -- what the recipes revealed -----------------------------------------------------------


def test_sigterm_to_every_process_of_a_worker_still_drains(pool: Pool, tmp_path: Path) -> None:
    """Slurm's scancel (and systemd's default KillMode=control-group, or a kill of every
    process of a container) sends SIGTERM to every process of fade-worker at once. That
    must drain as one SIGTERM to the supervisor does: the running task finishes, once.
    (It used to hand the task back: the supervisor passed SIGTERM on, and a worker took
    the second one as "leave now". The supervisor now drains its workers through their
    control socket, which asks for a drain, not for more.)"""
    pool.start_broker()
    supervisor = pool.start_worker(1)
    (worker,) = pool.wait_workers(1)
    marker = tmp_path / "ran"
    ex = fade.Executor(pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS)
    try:
        future = ex.submit(tasks.record_then_sleep, str(marker), "once", 2)
        wait_for(marker.exists, 30, "the task to start")
        # The signal reaches the worker process first, then its supervisor, which
        # passes it on: two separate SIGTERMs for the worker, as under Slurm.
        os.kill(worker, signal.SIGTERM)
        wait_for(
            lambda: [w["state"] for w in query(pool.address)["workers"]] == ["draining"],
            10,
            "the worker to drain",
        )
        supervisor.send_signal(signal.SIGTERM)
        drained = bool(concurrent.futures.wait([future], timeout=10).done)
        if not drained:
            pool.start_worker(1)  # the task was handed back: let it finish, so the client can
        assert future.result(timeout=30) == "once"
        assert drained and marker.read_text().count("once") == 1, marker.read_text()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
