"""Resources: what a host has for tasks that ask, and what each running task holds.

::

    fade-worker --resources gpu=2,mem=64G      (or detected: cpu, mem, gpu)
        -> every worker process's HELLO: resources {"cpu": 8, "mem": 6.9e10, "gpu": 2},
           pool = its supervisor's id (the processes of one host share one table)
    broker: ResourcePool per pool id: free amounts, free device indices
    task asking {"gpu": 1} -> a worker of a pool with 1 gpu free; the pool lends it
        device index 0 -> TASK devices {"gpu": [0]} -> CUDA_VISIBLE_DEVICES=<host's id 0>
        -> given back when the task ends, however it ends

A task that asks for nothing holds nothing: resources are for the tasks that say
what they need (a GPU, much memory, several cores). ``gpu`` is lent as device
indices; every other resource as an amount.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from fade.defaults import parse_size

__all__ = [
    "DEVICE_RESOURCES",
    "ResourcePool",
    "detect_resources",
    "device_env",
    "parse_resources",
]

#: Resources lent as device indices (the rest as amounts), and the variable that names them.
DEVICE_RESOURCES = {"gpu": "CUDA_VISIBLE_DEVICES"}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def parse_resources(text: str) -> dict[str, float]:
    """``"gpu=2,mem=64G,licence=1"`` -> {"gpu": 2.0, "mem": 68719476736.0, ...}.
    Raises ValueError naming what is wrong."""
    table: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, amount = item.partition("=")
        if not sep or not _NAME.fullmatch(name.strip()):
            raise ValueError(f"bad resource {item!r}: expected NAME=AMOUNT, e.g. gpu=2")
        table[name.strip()] = _amount(name.strip(), amount.strip())
    return table


def _amount(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float(parse_size(text))  # "64G": binary units, as --max-message-size
    if value < 0 or (name in DEVICE_RESOURCES and value != int(value)):
        raise ValueError(f"bad amount {text!r} for resource {name!r}")
    return value


def detect_resources() -> dict[str, float]:
    """What this host has, where that is cheap and reliable to find: CPUs, memory, and
    GPUs from CUDA_VISIBLE_DEVICES or, if that is not set, ``nvidia-smi -L``."""
    table = {"cpu": float(os.cpu_count() or 1)}
    memory = _total_memory()
    if memory:
        table["mem"] = float(memory)
    gpus = len(host_devices("gpu"))
    if gpus:
        table["gpu"] = float(gpus)
    return table


#: Where a cgroup says its CPU quota and period: v2 in one file, v1 in two.
_QUOTA_FILES = (("cpu.max", ""), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"))


def usable_cpus(cgroup: str = "/sys/fs/cgroup") -> float:
    """The CPUs this process may use: its affinity, bounded by its cgroup's CPU quota (a
    container's limit; cgroup v2's ``cpu.max`` or v1's ``cpu.cfs_quota_us``)."""
    cpus: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cpus = cpus or os.cpu_count() or 1
    for quota_file, period_file in _QUOTA_FILES:
        try:
            with open(os.path.join(cgroup, quota_file)) as f:
                quota, *rest = f.read().split()
            if period_file:
                with open(os.path.join(cgroup, period_file)) as f:
                    rest = f.read().split()
            if quota not in ("max", "-1") and int(rest[0]) > 0:
                cpus = min(cpus, int(quota) / int(rest[0]))
        except (OSError, IndexError, ValueError):
            continue
        break
    return cpus


def host_devices(resource: str) -> list[str]:
    """The host's devices of a kind, as the ids its variable takes (["0", "1"])."""
    variable = DEVICE_RESOURCES[resource]
    visible = os.environ.get(variable)
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if resource == "gpu" and shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU")]
    return []


def device_env(devices: bytes, host: dict[str, list[str]]) -> dict[str, str]:
    """The environment a task runs with for the device indices it was lent (a TASK
    record's ``devices``): {"CUDA_VISIBLE_DEVICES": "2"} for index 0 of host ids ["2", "3"]."""
    if not devices:
        return {}
    env = {}
    for resource, indices in json.loads(devices).items():
        variable = DEVICE_RESOURCES.get(resource)
        ids = host.get(resource, [])
        if variable is not None:
            env[variable] = ",".join(ids[i] if i < len(ids) else str(i) for i in indices)
    return env


def _total_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(slots=True, eq=False)
class ResourcePool:
    """The resources of one host (the worker processes of one supervisor), as the broker
    lends them to running tasks."""

    pool_id: str
    totals: dict[str, float]
    free: dict[str, float] = field(default_factory=dict)
    devices: dict[str, list[int]] = field(default_factory=dict)  # free device indices
    members: int = 0

    def __post_init__(self) -> None:
        self.free = dict(self.totals)
        for resource in DEVICE_RESOURCES:
            if resource in self.totals:
                self.devices[resource] = list(range(int(self.totals[resource])))

    def could(self, need: dict[str, float]) -> bool:
        """Whether this host could ever run a task that needs ``need``."""
        return all(self.totals.get(name, 0.0) >= amount for name, amount in need.items())

    def fits(self, need: dict[str, float]) -> bool:
        """Whether it can run one now."""
        return all(self.free.get(name, 0.0) >= amount for name, amount in need.items())

    def lend(self, need: dict[str, float]) -> bytes:
        """Take what a task needs; returns the device indices lent, as a TASK record wants."""
        lent: dict[str, list[int]] = {}
        for name, amount in need.items():
            self.free[name] -= amount
            if name in self.devices and amount:
                taken = self.devices[name][: int(amount)]
                del self.devices[name][: int(amount)]
                lent[name] = taken
        return json.dumps(lent, separators=(",", ":")).encode() if lent else b""

    def give_back(self, need: dict[str, float], devices: bytes) -> None:
        for name, amount in need.items():
            self.free[name] = min(self.totals.get(name, 0.0), self.free[name] + amount)
        if devices:
            for name, indices in json.loads(devices).items():
                self.devices.setdefault(name, []).extend(indices)
                self.devices[name].sort()
