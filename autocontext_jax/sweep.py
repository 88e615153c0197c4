"""Sweeps: a sweep file expanded into runs, and the commands that train them anywhere.

The command is launch/sweep.py. A sweep file is a Python file with `CONFIG`, the path of
the base config, and `get_sweep()`, which returns a list of override dicts, one per run,
such as {"pyramid.levels": 2}; `product` builds the grid of several axes. Each run trains
with `--config.KEY=VALUE` for its overrides into its own workdir RUNS_DIR/NAME, NAME made
of the keys whose values differ between runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import pathlib
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from autocontext_jax import compare


class SweepError(ValueError):
    """A sweep file or a sweep's runs cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A base config and the overrides of every run."""

    config: str
    overrides: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its name, its config overrides and its workdir."""

    name: str
    overrides: dict[str, Any]
    workdir: str


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep file: its CONFIG and the overrides get_sweep() returns."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    spec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "CONFIG", None), str) or not callable(
        getattr(module, "get_sweep", None)
    ):
        raise SweepError(f"{path}: a sweep file defines CONFIG (a config path) and get_sweep()")
    overrides = module.get_sweep()
    if not overrides or not all(isinstance(o, dict) for o in overrides):
        raise SweepError(f"{path}: get_sweep() must return a non-empty list of override dicts")
    return Sweep(module.CONFIG, tuple(dict(o) for o in overrides))


def run_name(overrides: Mapping[str, Any], varying: Sequence[str]) -> str:
    """A folder name from the overrides that differ between runs: `levels-2_mode-none`."""
    parts = [
        f"{key.rsplit('.', 1)[-1]}-{str(overrides[key])}" for key in varying if key in overrides
    ]
    return "_".join(parts) or "run"


def expand(sweep: Sweep, runs_dir: str) -> list[Run]:
    """The runs of a sweep, each with a unique workdir under `runs_dir`."""
    keys = list(dict.fromkeys(key for o in sweep.overrides for key in o))
    varying = [k for k in keys if len({repr(o.get(k, "<unset>")) for o in sweep.overrides}) > 1]
    runs = [
        Run(run_name(o, varying), o, str(pathlib.Path(runs_dir) / run_name(o, varying)))
        for o in sweep.overrides
    ]
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SweepError(f"runs {duplicates} appear more than once in the sweep: same overrides")
    return runs


def train_command(
    sweep: Sweep, run: Run, python: str = "python3", extra: Sequence[str] = ()
) -> list[str]:
    """The command line that trains and evaluates one run."""
    overrides = [f"--config.{key}={str(value)}" for key, value in run.overrides.items()]
    return [
        python,
        "-m",
        "autocontext_jax.main",
        f"--config={sweep.config}",
        f"--workdir={run.workdir}",
        *overrides,
        *extra,
    ]


def tpu_command(
    command: Sequence[str],
    tpu_name: str,
    zone: str,
    remote_dir: str,
    project: str | None = None,
) -> list[str]:
    """Run `command` on every worker of a Cloud TPU VM slice, as one multi-host job.

    The run's workdir must be on storage every worker shares (NFS, a gcsfuse mount).
    """
    remote = f"cd {shlex.quote(remote_dir)} && {shlex.join([*command, '--multihost'])}"
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
    if project:
        gcloud.append(f"--project={project}")
    return [*gcloud, "--worker=all", f"--command={remote}"]


def slurm_script(
    command: Sequence[str],
    run: Run,
    nodes: int = 1,
    gpus_per_node: int = 1,
    time: str = "24:00:00",
    partition: str | None = None,
    sbatch_lines: Sequence[str] = (),
) -> str:
    """An sbatch script: one process per node, each seeing its node's GPUs; srun starts them.

    With several nodes, main.py finds the SLURM job in the environment and joins the
    processes with jax.distributed.initialize.
    """
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={run.name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={run.workdir}/slurm-%j.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [f"#SBATCH {line}" for line in sbatch_lines]
    lines += [
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(run.workdir)}",
        f"srun {shlex.join(command)}",
    ]
    return "\n".join(lines) + "\n"


def finished_results(runs: Sequence[Run]) -> tuple[dict[str, dict], list[str]]:
    """The evaluations of the runs that have one, by name, and the names of those without."""
    results, missing = {}, []
    for run in runs:
        path = pathlib.Path(run.workdir) / compare.CASES_FILE
        if path.is_file():
            results[run.name] = compare.load_result(run.workdir)
        else:
            missing.append(run.name)
    return results, missing


def report(runs: Sequence[Run], metric: str = "dice") -> str:
    """One Markdown table of every level of every finished run, p-values against the first."""
    results, missing = finished_results(runs)
    if not results:
        raise SweepError(f"no run of the sweep has {compare.CASES_FILE} yet: {missing}")
    text = compare.comparison_markdown(compare.compare(results, metric, all_levels=True))
    if missing:
        text += f"\nNot finished (left out): {', '.join(missing)}\n"
    return text
