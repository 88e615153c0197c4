"""The ablation's base config on a 2-core CPU: the default pyramid, 800 steps, 20 phantom cases.

    autocontext ablation --config configs/ablation_base_cpu.py --levels 1,2 \
        --modes end_to_end,separate,none --seeds 0,1,2 --runs_dir runs/ablation_cpu

50 to 100 minutes for those 12 runs on a 2-core laptop CPU, by how busy it is; measured
with the CPU otherwise idle (50 minutes): 2-3 minutes per one-level run, 4-5 per two-level
joint run (about 0.3 s per step), 5-6 per separate run (twice the steps at one level's cost
each), each with its start and evaluation.
12 training and 8 held-out cases: each comparison has n = 8 cases (the 3 seeds are averaged
per case, not counted as pairs), too few for any test to survive Holm over the report's
tests; configs/ablation_depth_cpu.py cross-validates 20 cases. The phantom goes into its
own folder, so the default run's data is left alone.
"""

import pathlib

import ml_collections

from autocontext_jax.config.files import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """Return the default config sized for the CPU ablation."""
    config = load_config_file(pathlib.Path(__file__).with_name("default.py"))
    config.data.dir = "data/phantom_ablation"
    config.data.generate_phantom = True
    config.data.phantom_cases = 20
    config.data.num_val_cases = 8
    config.train.steps = 800
    config.train.checkpoint_every = 200
    config.train.log_every = 20
    return config
