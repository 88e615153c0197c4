"""Expand a sweep file into runs; train them here, on a Cloud TPU slice or with SLURM.

    python launch/sweep.py run launch/ablation_cpu.py --runs_dir runs/ablation_cpu
    python launch/sweep.py report launch/ablation_cpu.py --runs_dir runs/ablation_cpu

The command lives in autocontext_jax/cli/sweep.py; see its docstring for every backend.
"""

from autocontext_jax.cli.sweep import run

if __name__ == "__main__":
    run()
