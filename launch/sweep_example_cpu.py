"""A small pyramid-depth x context ablation on the phantom that runs in ~7 minutes on a CPU.

    autocontext sweep run launch/sweep_example_cpu.py --runs_dir runs/sweep_example_cpu
    autocontext sweep report launch/sweep_example_cpu.py --runs_dir runs/sweep_example_cpu

Levels 1 and 2, context modes end_to_end and none, all on one held-out split of 8 phantom
cases; the default U-Net trained for a quarter of the default's steps, so it shows the
workflow and the direction of the effect, not the paper's numbers.
With one level there is no context, so the two modes are the same run and run once.
An example of a sweep file; the ablation with seeds, every mode, paired tests and verdicts
is `autocontext ablation` (docs/ablation.md).
"""

from autocontext_jax.cli.sweep import product

CONFIG = "configs/default.py"

_SMALL_AND_SHORT = {
    "data.dir": "data/phantom_ablation_cpu",
    "data.generate_phantom": True,
    "data.phantom_cases": 20,
    "data.num_val_cases": 8,
    "data.crop_size": 24,
    "model.width": 8,
    "model.num_poolings": 3,
    "train.steps": 400,
    "train.checkpoint_every": 400,
    "train.log_every": 20,
}


def get_sweep() -> list[dict]:
    """Levels 1 and 2 x modes end_to_end and none, level 1 once."""
    runs = [{"pyramid.levels": 1}]
    runs += product({"pyramid.levels": [2], "pyramid.mode": ["end_to_end", "none"]})
    return [{**run, **_SMALL_AND_SHORT} for run in runs]
