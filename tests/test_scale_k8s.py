"""The autoscaled Kubernetes variants (deploy/k8s/keda, deploy/k8s/hpa) as far as one
machine allows: no cluster, no KEDA, no Prometheus here.

* Both render with ``kubectl kustomize``; the Kubernetes objects validate against the
  Kubernetes JSON schemas (``kubernetes-validate``, offline, strict), and the KEDA
  ScaledObject against KEDA's own CRD schema (tests/schemas/, copied from KEDA's
  repository), made strict the way the API server's pruning would surface a misspelt
  field: no unknown field where the schema lists the fields.
* The numbers fit together: the autoscalers target the worker Deployment, one replica
  per ``--processes`` tasks, the same idle time for scaling down and for zero.
* The scaling query, evaluated on a real broker's ``/metrics``, counts the tasks the pool
  owes, including those a pool at zero replicas has never seen (the clients' backlog).
* The drain fits the grace period: a busy worker, started with the container's command,
  arguments and environment, is sent SIGTERM as the kubelet would; it finishes its
  running tasks, hands back the others (each runs once, elsewhere), and leaves within a
  second or so of its tasks' end, well within ``terminationGracePeriodSeconds``.
"""

from __future__ import annotations

import copy
import re
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
from conftest import free_port, kill_tree, unavailable, wait_for
from deployment import BIN, environ, make_pool_keys

import fade
from fade.status import query

yaml = pytest.importorskip("yaml", reason="pyyaml (in the test extra) reads the manifests")

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
CRD = Path(__file__).resolve().parent / "schemas" / "keda.sh_scaledobjects.yaml"
K8S_VERSIONS = ("1.27", "1.33")
#: The trigger metadata KEDA's Prometheus scaler reads (pkg/scalers/prometheus_scaler.go,
#: the ``keda:"name=..."`` tags, at the commit the CRD was copied from).
PROMETHEUS_KEYS = frozenset(
    {
        "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
        "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion",
        "timeout", "identityOwner",
    }
)  # fmt: skip


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl", "kubectl not installed: Debian's kubernetes-client package")
    out = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def worker_container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = docs["Deployment/fade-worker"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def processes(docs: dict[str, dict[str, Any]]) -> int:
    args = worker_container(docs)["args"]
    return int(args[args.index("--processes") + 1])


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it lists properties and
    keeps no unknown fields: what the API server would prune, reported instead."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def keda_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert version["name"] == "v1alpha1"
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server's
    return schema  # type: ignore[no-any-return]


def validate_scaled_object(doc: dict[str, Any]) -> None:
    import jsonschema

    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(doc, keda_schema())
    for trigger in doc["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert set(trigger["metadata"]) <= PROMETHEUS_KEYS, trigger["metadata"]


# -- rendering and validation ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["keda", "hpa"])
def test_the_autoscaled_variants_render_and_validate(variant: str) -> None:
    import kubernetes_validate

    docs = by_kind(kustomize(K8S / variant))
    scaler = {"keda": "ScaledObject/fade-worker", "hpa": "HorizontalPodAutoscaler/fade-worker"}
    assert set(docs) == {*by_kind(kustomize(K8S)), scaler[variant]}
    for doc in docs.values():
        if doc["kind"] == "ScaledObject":
            validate_scaled_object(doc)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    # The autoscaler owns the replica count; everything else is the plain recipe's.
    base = by_kind(kustomize(K8S))
    assert "replicas" not in docs["Deployment/fade-worker"]["spec"]
    fixed = copy.deepcopy(base["Deployment/fade-worker"])
    del fixed["spec"]["replicas"]
    assert docs["Deployment/fade-worker"] == fixed
    assert all(docs[name] == doc for name, doc in base.items() if name != "Deployment/fade-worker")


def test_the_scaled_object_validation_can_fail() -> None:
    import jsonschema

    docs = by_kind(kustomize(K8S / "keda"))
    good = docs["ScaledObject/fade-worker"]
    validate_scaled_object(good)
    misspelt = copy.deepcopy(good)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["cooldownPeriod"] = "2m"
    nested = copy.deepcopy(good)
    behavior = nested["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleDown"]["stabilizationWindow"] = behavior["scaleDown"].pop(
        "stabilizationWindowSeconds"
    )
    for bad in (misspelt, wrong_type, nested):
        with pytest.raises(jsonschema.ValidationError):
            validate_scaled_object(bad)
    unknown_key = copy.deepcopy(good)
    unknown_key["spec"]["triggers"][0]["metadata"]["treshold"] = "2"
    with pytest.raises(AssertionError):
        validate_scaled_object(unknown_key)


def test_the_autoscalers_fit_the_workers() -> None:
    keda = by_kind(kustomize(K8S / "keda"))
    hpa = by_kind(kustomize(K8S / "hpa"))
    scaled = keda["ScaledObject/fade-worker"]["spec"]
    auto = hpa["HorizontalPodAutoscaler/fade-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "fade-worker"
    assert auto["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fade-worker",
    }
    # One task per worker process: a replica per --processes outstanding tasks.
    (trigger,) = scaled["triggers"]
    assert float(trigger["metadata"]["threshold"]) == processes(keda)
    (metric,) = auto["metrics"]
    assert float(metric["external"]["target"]["averageValue"]) == processes(hpa)
    # To zero with KEDA (an HPA alone keeps one), from zero on the first task.
    assert scaled["minReplicaCount"] == 0 and float(trigger["metadata"]["activationThreshold"]) == 0
    assert auto["minReplicas"] == 1
    assert scaled["maxReplicaCount"] == auto["maxReplicas"]
    # The idle time: the same window to shrink and to go to zero, and no delay to grow.
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == auto["behavior"]
    idle = behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert (
        scaled["cooldownPeriod"] == idle and behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    )
    # The workers drain within their grace period (see the drain test below).
    pod = keda["Deployment/fade-worker"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert "lifecycle" not in worker_container(keda)  # no preStop: SIGTERM is the drain
    assert worker_container(keda)["command"] == ["fade-worker"]  # PID 1 gets the SIGTERM


# -- the query on a real broker ------------------------------------------------------------------

QUERY = re.compile(r"sum\((\w+)\)(?: \+ sum\((\w+)\))*")


def evaluate(query_text: str, metrics: str) -> float:
    """The scaling query (sums of gauges, added) on a scrape of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    assert QUERY.fullmatch(query_text), query_text
    names = re.findall(r"sum\((\w+)\)", query_text)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    assert set(names) <= values.keys(), f"{set(names) - values.keys()} not in /metrics"
    return sum(values[name] for name in names)


@pytest.fixture
def processes_started() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            kill_tree(process.pid)
            process.wait()


def test_the_scaling_query_counts_what_the_pool_owes(
    processes_started: list[subprocess.Popen[bytes]],
) -> None:
    """At zero replicas the tasks wait in the clients: the query still sees them; once a
    worker runs some, running and queued tasks count the same."""
    docs = by_kind(kustomize(K8S / "keda"))
    (trigger,) = docs["ScaledObject/fade-worker"]["spec"]["triggers"]
    text = trigger["metadata"]["query"]
    address, http = f"tcp://127.0.0.1:{free_port()}", free_port()
    processes_started.append(
        subprocess.Popen(
            [str(BIN / "fade-broker"), address, "--http", f"127.0.0.1:{http}"], env=environ()
        )
    )

    def scrape() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as page:
            return evaluate(text, page.read().decode())

    wait_for(lambda: _up(http), 20, "the broker's HTTP endpoint")
    with fade.Executor(address) as ex:
        futures = [ex.submit(tasks.sleep_and_return, 1.0, i) for i in range(16)]
        # /metrics is published once a second.
        wait_for(lambda: scrape() == 16, 15, "the query to count 16 tasks at zero workers")
        processes_started.append(
            subprocess.Popen([str(BIN / "fade-worker"), address, "--processes", "2"], env=environ())
        )
        wait_for(lambda: query(address)["running"] >= 2, 30, "tasks running")
        value = scrape()
        assert 12 <= value <= 16, value  # a few may have finished meanwhile
        assert [f.result(timeout=60) for f in futures] == list(range(16))
    wait_for(lambda: scrape() == 0, 15, "the query to fall to 0")


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2):
            return True
    except OSError:
        return False


# -- the drain and the grace period ------------------------------------------------------------


def test_a_busy_worker_drains_on_sigterm_within_the_grace_period(
    tmp_path: Path, processes_started: list[subprocess.Popen[bytes]]
) -> None:
    """The worker container (command, args, env of the rendered keda variant; the broker's
    Service and the key's mount path pointed here) runs two 4-second tasks and holds
    more; SIGTERM to its first process, as the kubelet sends: the two finish, the rest go
    back and run once on the next worker, and the pod's process exits soon after its tasks
    end, inside terminationGracePeriodSeconds."""
    docs = by_kind(kustomize(K8S / "keda"))
    container = worker_container(docs)
    grace = docs["Deployment/fade-worker"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    keys = make_pool_keys(tmp_path / "pool")
    address = f"tcp://127.0.0.1:{free_port()}"
    processes_started.append(
        subprocess.Popen(
            [str(BIN / "fade-broker"), address, "--keys", str(keys.dir)], env=environ()
        )
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FADE_KEYS"].startswith("/etc/fade/")
    pod_env = environ({**env, "FADE_ADDRESS": address, "FADE_KEYS": str(keys.worker)})
    argv = [str(BIN / container["command"][0]), *container["args"]]

    def start_pod() -> subprocess.Popen[bytes]:
        pod = subprocess.Popen(argv, env=pod_env, stderr=(tmp_path / "pod.log").open("ab"))
        processes_started.append(pod)
        return pod

    pod = start_pod()
    spans, short = tmp_path / "spans", tmp_path / "short"
    n = processes(docs)
    with fade.Executor(address, keys=keys.client) as ex:
        wait_for(
            lambda: len(query(address, keys=str(keys.client))["workers"]) == n,
            30,
            "the pod's workers",
        )
        long = [ex.submit(tasks.record_span, str(spans), f"long{i}", 4.0) for i in range(n)]
        wait_for(
            lambda: (
                sum(w["state"] == "busy" for w in query(address, keys=str(keys.client))["workers"])
                == n
            ),
            20,
            "every worker process busy",
        )
        rest = [ex.submit(tasks.record, str(short), i) for i in range(8)]
        time.sleep(0.5)  # the rest reach the broker, some the pod's processes (prefetch)
        sent = time.time()
        pod.send_signal(signal.SIGTERM)
        pod.wait(timeout=grace)
        left = time.time()
        assert pod.returncode == 0, (tmp_path / "pod.log").read_text()
        start_pod()  # the next pod takes what was handed back
        assert [f.result(timeout=60) for f in long] == [f"long{i}" for i in range(n)]
        assert [f.result(timeout=60) for f in rest] == list(range(8))
    ends = [float(line.split()[2]) for line in spans.read_text().splitlines()]
    assert len(ends) == n  # each long task ran once: the drain let it finish
    assert sorted(int(line.split()[0]) for line in short.read_text().splitlines()) == list(range(8))
    took, after = left - sent, left - max(ends)
    assert max(ends) < left and took < grace
    assert after < 5.0, f"the pod left {after:.2f}s after its tasks ended"
    print(
        f"\ndrain: SIGTERM to exit {took:.2f}s for tasks that had {max(ends) - sent:.2f}s "
        f"left; exit {after:.2f}s after the last task ended (grace {grace}s)"
    )
