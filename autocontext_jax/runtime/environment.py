"""What a run was trained with: package versions, devices and host, one line per train call.

Training repeats bit for bit on one machine and software stack, but not across them: XLA
compiles for the host's CPU or accelerator, and another jaxlib or CPU sums floats in
another order, which moves a run by about its spread over seeds. WORKDIR/environment.jsonl
keeps, for each start or resume, what is needed to tell such a change from a code change.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import socket
from collections.abc import Mapping
from typing import Any

import jax

from autocontext_jax.data.atomic import write_text_atomically

ENVIRONMENT_FILE = "environment.jsonl"
# The distributions whose version can change a run's numbers.
PACKAGES = (
    "autocontext-jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "numpy",
    "scipy",
)


def package_version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Flag prefixes of the vector extensions XLA compiles CPU kernels for (x86 and Arm): two
# CPUs of one model name (a VM's "AMD EPYC") can differ in them, and so in their sums.
_VECTOR_FLAGS = ("sse", "ssse", "avx", "amx", "fma", "f16c", "asimd", "sve")


def _cpuinfo(path: pathlib.Path) -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo ({} where there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_identity(cpuinfo: pathlib.Path = pathlib.Path("/proc/cpuinfo")) -> dict[str, str]:
    """The host CPU as `cpu` (model name with family, model and stepping, else what
    `platform` knows) and `cpu_features` (its `_VECTOR_FLAGS` extensions, sorted; '' if none)."""
    fields = _cpuinfo(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine()
    ids = [f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields]
    flags = (fields.get("flags") or fields.get("features") or "").split()
    return {
        "cpu": f"{name} ({', '.join(ids)})" if ids else name,
        "cpu_features": " ".join(sorted(f for f in flags if f.startswith(_VECTOR_FLAGS))),
    }


def usable_cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def environment_record(
    start_step: int, lowering: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The software, devices and host of this process, for a train call from `start_step`.

    `lowering` is what the run's convolution resolved to on this host (`conv_impl`, how it
    was chosen and its timings: runtime/autotune.py), recorded beside the rest.
    """
    devices = jax.devices()
    return {
        "start_step": start_step,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        **cpu_identity(),
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "backend": jax.default_backend(),
        "devices": sorted({d.device_kind for d in devices}),
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **(lowering or {}),
    }


def append_environment(
    workdir: str | pathlib.Path, start_step: int, lowering: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Append this train call's `environment_record` to WORKDIR/environment.jsonl.

    The file is rewritten atomically, so a run killed while writing never leaves a torn
    line that would stop its resume.
    """
    record = environment_record(start_step, lowering)
    lines = [json.dumps(r) + "\n" for r in [*read_environments(workdir), record]]
    write_text_atomically(pathlib.Path(workdir) / ENVIRONMENT_FILE, "".join(lines))
    return record


def read_environments(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every train call's record of the run in `workdir` ([] for a run that has none)."""
    path = pathlib.Path(workdir) / ENVIRONMENT_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # torn or hand-edited: the record is lost, not the run
            continue
    return records


def _stack_items(record: dict[str, Any]) -> dict[str, Any]:
    """What of a record can change the numbers: CPU and its vector extensions, backend, devices
    and package versions."""
    return {
        "cpu": record["cpu"],
        "cpu_features": record.get("cpu_features", ""),
        "backend": record["backend"],
        "devices": ", ".join(record["devices"]),
        "device_count": record["device_count"],
        **{name: record["packages"].get(name) or "" for name in PACKAGES},
    }


def stack(record: dict[str, Any]) -> tuple:
    """A record's `_stack_items` as a hashable key: equal keys, the same numbers."""
    return tuple(_stack_items(record).items())


def stack_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The parts of `stack` that differ between two records, as 'what: before -> after'.

    So does the convolution's lowering (`conv_impl`), which changes how the same function
    is rounded, where both records name it (records written before it was kept do not).
    """
    old, new = _stack_items(before), _stack_items(after)
    changes = [f"{key}: {old[key]} -> {new[key]}" for key in old if old[key] != new[key]]
    lowerings = before.get("conv_impl"), after.get("conv_impl")
    if None not in lowerings and lowerings[0] != lowerings[1]:
        changes.append(f"conv_impl: {lowerings[0]} -> {lowerings[1]}")
    return changes


def resume_note(previous: list[dict[str, Any]], record: dict[str, Any]) -> str | None:
    """A line for a run resumed on another stack than its last train call, else None."""
    if not previous:
        return None
    changes = stack_changes(previous[-1], record)
    if not changes:
        return None
    return (
        f"Resumed on another software/hardware stack ({'; '.join(changes)}): from step "
        f"{record['start_step']} on, this run will not match one trained on a single stack "
        "bit for bit."
    )


def mixed_stacks_note(workdirs: Mapping[str, str | pathlib.Path]) -> str | None:
    """A line naming runs trained on different stacks (CPU, devices, versions), else None.

    A run resumed on another stack than it started on counts as a stack of its own. Runs
    with no environment.jsonl (trained before it was written) are named when others have one.
    """
    stacks: dict[tuple, list[str]] = {}
    unknown = []
    for name, workdir in workdirs.items():
        records = read_environments(workdir)
        if records:
            stacks.setdefault(tuple(sorted({stack(r) for r in records})), []).append(name)
        else:
            unknown.append(name)
    notes = []
    if len(stacks) > 1:
        groups = " | ".join(", ".join(names) for names in stacks.values())
        notes.append(
            f"Runs trained on {len(stacks)} different software/hardware stacks (CPU, devices or "
            f"package versions, in {ENVIRONMENT_FILE}): {groups}; a difference between "
            "them mixes that change with the one compared."
        )
    if unknown and stacks:
        notes.append(f"No {ENVIRONMENT_FILE} in {', '.join(unknown)}: their stack is unknown.")
    return " ".join(notes) if notes else None
