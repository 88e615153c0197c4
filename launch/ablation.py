"""Pyramid depth x context mode x seed, at the default config's size (or any config's).

    python -m autocontext_jax.sweep run launch/ablation.py --runs_dir runs/ablation
    python -m autocontext_jax.sweep run launch/ablation.py --runs_dir runs/ablation \
        --backend=slurm --slurm_gpus_per_node=1 --dry_run
    python -m autocontext_jax.sweep report launch/ablation.py --runs_dir runs/ablation

Levels 1-3 x modes end_to_end, stagewise and none x seeds 0-2; a one-level pyramid has no
context, so its modes are one run per seed. Every run evaluates the same held-out split
(data.split_seed is not swept), so the report's paired tests compare like with like.
"""

from autocontext_jax.cli.sweep import product

CONFIG = "configs/default.py"


def get_sweep() -> list[dict]:
    """Every (levels, mode, seed), without the duplicate modes of one level."""
    grid = product(
        {
            "pyramid.levels": [1, 2, 3],
            "pyramid.mode": ["end_to_end", "stagewise", "none"],
            "seed": [0, 1, 2],
        }
    )
    return [run for run in grid if run["pyramid.levels"] > 1 or run["pyramid.mode"] == "end_to_end"]
