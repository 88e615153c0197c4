"""A small pyramid-depth x context ablation on the phantom that runs in ~10 minutes on a CPU.

    python -m autocontext_jax.sweep run launch/ablation_cpu.py --runs_dir runs/ablation_cpu
    python -m autocontext_jax.sweep report launch/ablation_cpu.py --runs_dir runs/ablation_cpu

Levels 1 and 2, context modes end_to_end and none, all on one held-out split of 8 phantom
cases; a tiny U-Net trained briefly, so it shows the workflow, not the paper's numbers.
With one level there is no context, so the two modes are the same run and run once.
"""

from autocontext_jax.sweep import product

CONFIG = "configs/default.py"

_SMALL_AND_SHORT = {
    "data.dir": "data/phantom_ablation_cpu",
    "data.phantom_cases": 20,
    "data.num_val_cases": 8,
    "data.crop_size": 16,
    "model.width": 4,
    "model.num_poolings": 2,
    "train.steps": 200,
    "train.checkpoint_every": 200,
    "train.log_every": 20,
}


def get_sweep() -> list[dict]:
    """Levels 1 and 2 x modes end_to_end and none, level 1 once."""
    runs = [{"pyramid.levels": 1}]
    runs += product({"pyramid.levels": [2], "pyramid.mode": ["end_to_end", "none"]})
    return [{**run, **_SMALL_AND_SHORT} for run in runs]
