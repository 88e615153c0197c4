"""Expand a sweep file into runs; train them here, on a Cloud TPU slice or with SLURM.

    python launch/sweep.py run launch/ablation_cpu.py --runs_dir runs/ablation_cpu
    python launch/sweep.py run SWEEP --runs_dir R --backend=tpu --tpu_name=NAME --zone=Z
    python launch/sweep.py run SWEEP --runs_dir R --backend=slurm --slurm_nodes=2 --dry_run
    python launch/sweep.py report launch/ablation_cpu.py --runs_dir runs/ablation_cpu

`run` trains the runs one after another here (then prints the report), or submits each to
every worker of a TPU VM slice (gcloud ... tpu-vm ssh --worker=all) or as an sbatch job;
`--dry_run` prints the commands (and the sbatch scripts) and runs nothing. `report` gathers
the evaluated runs into one table with paired Wilcoxon p-values against the first run.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

from autocontext_jax import compare
from autocontext_jax.metrics import METRIC_NAMES
from autocontext_jax.sweep import (
    Run,
    Sweep,
    SweepError,
    expand,
    load_sweep,
    report,
    slurm_script,
    tpu_command,
    train_command,
)

BACKENDS = ("local", "tpu", "slurm")

_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Folder of the sweep's run workdirs.")
_BACKEND = flags.DEFINE_enum("backend", "local", BACKENDS, "Where the runs go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands (and scripts); run nothing.")
_PYTHON = flags.DEFINE_string(
    "python", None, "Python interpreter of the runs (default: this one locally, else python3)."
)
_METRIC = flags.DEFINE_enum("report_metric", "dice", METRIC_NAMES, "Metric of the report.")
_TPU_NAME = flags.DEFINE_string("tpu_name", None, "Cloud TPU VM (slice) name.")
_ZONE = flags.DEFINE_string("zone", None, "Cloud TPU zone.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
_REMOTE_DIR = flags.DEFINE_string(
    "remote_dir", "autocontext-jax", "The repository's checkout on every TPU worker."
)
_SLURM_NODES = flags.DEFINE_integer("slurm_nodes", 1, "Nodes per run.")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", 1, "GPUs per node.")
_SLURM_TIME = flags.DEFINE_string("slurm_time", "24:00:00", "Time limit per run.")
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", None, "SLURM partition.")


def _launch(sweep: Sweep, runs: Sequence[Run]) -> int:
    """Start (or print) every run on the chosen backend; the number of failed launches."""
    local = _BACKEND.value == "local"
    python = _PYTHON.value or (sys.executable if local and not _DRY_RUN.value else "python3")
    failed = 0
    for run in runs:
        command = train_command(sweep, run, python)
        if _BACKEND.value == "tpu":
            if not (_TPU_NAME.value and _ZONE.value):
                raise app.UsageError("--backend=tpu needs --tpu_name and --zone")
            command = tpu_command(
                command, _TPU_NAME.value, _ZONE.value, _REMOTE_DIR.value, _PROJECT.value
            )
        elif _BACKEND.value == "slurm":
            script = slurm_script(
                command,
                run,
                _SLURM_NODES.value,
                _SLURM_GPUS.value,
                _SLURM_TIME.value,
                _SLURM_PARTITION.value,
            )
            script_path = pathlib.Path(run.workdir) / "job.sbatch"
            command = ["sbatch", str(script_path)]
            if _DRY_RUN.value:
                print(f"# {script_path}\n{script}")
            else:
                script_path.parent.mkdir(parents=True, exist_ok=True)
                script_path.write_text(script)
        print(f"== {run.name}: {shlex.join(command)}", flush=True)
        if not _DRY_RUN.value:
            failed += subprocess.run(command, check=False).returncode != 0
    return failed


def main(argv: list[str]) -> None:
    """`run SWEEP` launches the sweep's runs; `report SWEEP` prints their gathered table."""
    if len(argv) != 3 or argv[1] not in ("run", "report"):
        raise app.UsageError("usage: python launch/sweep.py run|report SWEEP_FILE --runs_dir DIR")
    if _RUNS_DIR.value is None:
        raise app.UsageError("--runs_dir is required: the folder of the sweep's workdirs")
    try:
        sweep = load_sweep(argv[2])
        runs = expand(sweep, _RUNS_DIR.value)
        if argv[1] == "report":
            print(report(runs, _METRIC.value))
            return
        failed = _launch(sweep, runs)
        if failed:
            sys.exit(f"{failed} of {len(runs)} runs failed")
        if _BACKEND.value == "local" and not _DRY_RUN.value:
            print(report(runs, _METRIC.value))
    except (SweepError, compare.ComparisonError) as error:
        sys.exit(f"Sweep {argv[2]}: {error}")


if __name__ == "__main__":
    app.run(main)
