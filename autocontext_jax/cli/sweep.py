"""Sweeps: a sweep file expanded into runs, trained here, on a Cloud TPU slice or with SLURM.

    autocontext sweep run launch/sweep_example_cpu.py --runs_dir runs/sweep_example_cpu
    autocontext sweep run SWEEP --runs_dir R --backend=tpu --tpu_name=NAME --zone=Z
    autocontext sweep run SWEEP --runs_dir R --backend=slurm --slurm_nodes=2 --dry_run
    autocontext sweep report launch/sweep_example_cpu.py --runs_dir runs/sweep_example_cpu

`run` trains the runs one after another here (then prints the report), or submits each to
every worker of a TPU VM slice (gcloud ... tpu-vm ssh --worker=all) or as an sbatch job;
`--dry_run` prints the commands (and the sbatch scripts) and runs nothing. `report` gathers
the evaluated runs into one table with paired Wilcoxon p-values against the first run.

A sweep file is a Python file with `CONFIG`, the path of
the base config, and `get_sweep()`, which returns a list of override dicts, one per run,
such as {"pyramid.levels": 2}; `product` builds the grid of several axes. Each run trains
with `--config.KEY=VALUE` for its overrides into its own workdir RUNS_DIR/NAME, NAME made
of the keys whose values differ between runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import pathlib
import shlex
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from autocontext_jax.cli.common import CommandError, run_command
from autocontext_jax.config.files import load_config_file, load_python_file
from autocontext_jax.data.atomic import write_text_atomically
from autocontext_jax.evaluation import compare
from autocontext_jax.evaluation.metrics import METRIC_NAMES

FLAGS = flags.FLAGS
BACKENDS = ("local", "tpu", "slurm")


class SweepError(CommandError, ValueError):
    """A sweep file or a sweep's runs cannot be used; the message names the file."""

    prefix = "Bad sweep"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A base config and the overrides of every run."""

    config: str
    overrides: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class SweepRun:
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
    try:
        module = load_python_file(path)
        if not isinstance(getattr(module, "CONFIG", None), str) or not callable(
            getattr(module, "get_sweep", None)
        ):
            raise SweepError(f"{path}: a sweep file defines CONFIG (a config path) and get_sweep()")
        overrides = module.get_sweep()
    except SweepError:
        raise
    except Exception as error:  # the user's own code failed: where and why is the message
        raise SweepError(f"{path}{_line_of(error, path)}: {type(error).__name__}: {error}") from (
            error
        )
    if (
        not isinstance(overrides, list | tuple)
        or not overrides
        or not all(isinstance(o, dict) and all(isinstance(k, str) for k in o) for o in overrides)
    ):
        raise SweepError(
            f"{path}: get_sweep() must return a non-empty list of dicts of config field "
            f"names such as 'pyramid.levels', got {overrides!r:.80}"
        )
    return Sweep(module.CONFIG, tuple(dict(o) for o in overrides))


def _line_of(error: Exception, path: pathlib.Path) -> str:
    # The line of the sweep file the error arose on, as ":LINE" (a SyntaxError carries it).
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return f":{error.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    return f":{lines[-1]}" if lines else ""


def check_fields(sweep: Sweep) -> None:
    """Refuse, before any run starts, a CONFIG that does not load or a field it lacks."""
    if not pathlib.Path(sweep.config).is_file():
        raise SweepError(f"CONFIG = {sweep.config!r}: no such config file in {os.getcwd()}")
    config = load_config_file(sweep.config)
    for key in dict.fromkeys(key for overrides in sweep.overrides for key in overrides):
        node = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = list(node) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SweepError(f"{key!r}: {sweep.config} has no such field{hint}")
            node = node[part]


def run_name(overrides: Mapping[str, Any], varying: Sequence[str]) -> str:
    """A folder name from the overrides that differ between runs: `levels-2_mode-none`."""
    parts = [
        f"{key.rsplit('.', 1)[-1]}-{str(overrides[key])}" for key in varying if key in overrides
    ]
    return "_".join(parts) or "run"


def expand(sweep: Sweep, runs_dir: str) -> list[SweepRun]:
    """The runs of a sweep, each with a unique workdir under `runs_dir`."""
    keys = list(dict.fromkeys(key for o in sweep.overrides for key in o))
    varying = [k for k in keys if len({repr(o.get(k, "<unset>")) for o in sweep.overrides}) > 1]
    runs = [
        SweepRun(run_name(o, varying), o, str(pathlib.Path(runs_dir) / run_name(o, varying)))
        for o in sweep.overrides
    ]
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SweepError(f"runs {duplicates} appear more than once in the sweep: same overrides")
    return runs


def train_command(
    sweep: Sweep, run: SweepRun, python: str = "python3", extra: Sequence[str] = ()
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
    run: SweepRun,
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


def finished_results(runs: Sequence[SweepRun]) -> tuple[dict[str, dict], list[str]]:
    """The evaluations of the runs that have one, by name, and the names of those without."""
    results, missing = {}, []
    for run in runs:
        path = pathlib.Path(run.workdir) / compare.CASES_FILE
        if path.is_file():
            results[run.name] = compare.load_result(run.workdir)
        else:
            missing.append(run.name)
    return results, missing


def report(runs: Sequence[SweepRun], metric: str = "dice") -> str:
    """One Markdown table of every level of every finished run, p-values against the first."""
    results, missing = finished_results(runs)
    if not results:
        raise SweepError(f"no run of the sweep has {compare.CASES_FILE} yet: {missing}")
    text = compare.comparison_markdown(compare.compare(results, metric, all_levels=True))
    if missing:
        text += f"\nNot finished (left out): {', '.join(missing)}\n"
    return text


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("runs_dir", None, "Folder of the sweep's run workdirs.")
    flags.DEFINE_enum("backend", "local", BACKENDS, "Where the runs go.")
    flags.DEFINE_bool("dry_run", False, "Print the commands (and scripts); run nothing.")
    flags.DEFINE_string(
        "python", None, "Python interpreter of the runs (default: this one locally, else python3)."
    )
    flags.DEFINE_enum("report_metric", "dice", METRIC_NAMES, "Metric of the report.")
    flags.DEFINE_string("tpu_name", None, "Cloud TPU VM (slice) name.")
    flags.DEFINE_string("zone", None, "Cloud TPU zone.")
    flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
    flags.DEFINE_string(
        "remote_dir", "autocontext-jax", "The repository's checkout on every TPU worker."
    )
    flags.DEFINE_integer("slurm_nodes", 1, "Nodes per run.")
    flags.DEFINE_integer("slurm_gpus_per_node", 1, "GPUs per node.")
    flags.DEFINE_string("slurm_time", "24:00:00", "Time limit per run.")
    flags.DEFINE_string("slurm_partition", None, "SLURM partition.")


def launch_runs(sweep: Sweep, runs: Sequence[SweepRun]) -> int:
    """Start (or print) every run on the backend of the flags; the number of failed launches.

    Reads the flags `define_flags` defines (the ablation command defines them too).
    """
    local = FLAGS.backend == "local"
    python = FLAGS.python or (sys.executable if local and not FLAGS.dry_run else "python3")
    failed = 0
    for run in runs:
        command = train_command(sweep, run, python)
        if FLAGS.backend == "tpu":
            if not (FLAGS.tpu_name and FLAGS.zone):
                raise app.UsageError("--backend=tpu needs --tpu_name and --zone")
            command = tpu_command(
                command, FLAGS.tpu_name, FLAGS.zone, FLAGS.remote_dir, FLAGS.project
            )
        elif FLAGS.backend == "slurm":
            script = slurm_script(
                command,
                run,
                FLAGS.slurm_nodes,
                FLAGS.slurm_gpus_per_node,
                FLAGS.slurm_time,
                FLAGS.slurm_partition,
            )
            script_path = pathlib.Path(run.workdir) / "job.sbatch"
            command = ["sbatch", str(script_path)]
            if FLAGS.dry_run:
                print(f"# {script_path}\n{script}")
            else:
                script_path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomically(script_path, script)
        print(f"== {run.name}: {shlex.join(command)}", flush=True)
        if not FLAGS.dry_run:
            failed += subprocess.run(command, check=False).returncode != 0
    return failed


def main(argv: list[str]) -> None:
    """`run SWEEP` launches the sweep's runs; `report SWEEP` prints their gathered table."""
    if len(argv) != 3 or argv[1] not in ("run", "report"):
        raise app.UsageError("usage: autocontext sweep run|report SWEEP_FILE --runs_dir DIR")
    if FLAGS.runs_dir is None:
        raise app.UsageError("--runs_dir is required: the folder of the sweep's workdirs")
    sweep = load_sweep(argv[2])
    runs = expand(sweep, FLAGS.runs_dir)
    if argv[1] == "report":
        print(report(runs, FLAGS.report_metric))
        return
    check_fields(sweep)
    failed = launch_runs(sweep, runs)
    if failed:
        sys.exit(f"{failed} of {len(runs)} runs failed")
    if FLAGS.backend == "local" and not FLAGS.dry_run:
        print(report(runs, FLAGS.report_metric))


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv)


if __name__ == "__main__":
    run()
