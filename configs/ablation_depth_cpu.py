"""The depth ablation on a 2-core CPU: pyramid depth 1, 2 and 3, cross-validated over 5 folds.

    autocontext ablation --config configs/ablation_depth_cpu.py --levels 1,2,3 \
        --modes end_to_end,none --seeds 0,1 --folds 5 --runs_dir runs/ablation_depth_cpu

5 configurations (one U-Net; end_to_end and none at depths 2 and 3) x 5 folds x 2 seeds =
50 runs of 600 steps; every one of the 20 phantom cases is scored once per configuration and
seed, by the fold model that held it out, so each test has n = 20 independent cases.

Why these sizes. The phantom is the default one (128 x 112 x 96 voxels of 1.5 mm: a
192 x 168 x 144 mm body). Level 1 of a depth-S pyramid sees crop_size x 2^S native voxels
per axis; with crop_size 16 that is 48 mm for one U-Net, 96 mm (half the body's width) for depth 2
and 192 mm (the whole body, at 12 mm voxels) for depth 3, so only the third level gives the
pyramid the whole-abdomen view that the paper's level 1 has. With the default crop of 24,
depth 2 already sees 144 mm, and a third level's 288 mm cube would be four-fifths padding:
a coarser copy, not a new view. A finer phantom (1.0 mm) with crop 24 would give the same
geometry at 3.4 times the cost per step and per evaluated voxel. crop_size 16 is a multiple
of 2^num_poolings = 8; a depth-3 volume is padded to a multiple of 2^3 x 2^3 = 64 voxels.

Time (docs/ablation.md has the commands and the arithmetic): measured on 2026-12-06 with
the CPU shared (load average 7 to 10 on 2 cores), 50-step runs took a median 0.13 s per
step at depth 1, 0.44 at depth 2 and 0.51 at depth 3, plus 64 to 98 s per run for start-up,
checkpoints and evaluating its 4 held-out cases (compiled programs cached; the first run
of a depth compiled for 32 to 86 s). At those speeds the 50 runs take about 4.6 hours. The
documented CPU ablation config, timed in the same minutes, ran 4.1 times slower than its
idle figure (1.22 against 0.3 s per step), so on an otherwise idle 2-core CPU the grid
extrapolates to about 67 minutes. The grid itself has not been run yet.
"""

import pathlib

import ml_collections

from autocontext_jax.config.files import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """Return the default config sized for the cross-validated depth ablation on a CPU."""
    config = load_config_file(pathlib.Path(__file__).with_name("default.py"))
    config.data.dir = "data/phantom_depth"
    config.data.generate_phantom = True
    config.data.phantom_cases = 20
    config.data.num_folds = 5
    config.data.crop_size = 16
    config.train.steps = 600
    config.train.checkpoint_every = 200
    config.train.log_every = 20
    config.eval.every = 0  # the folds' held-out cases are evaluated once, at the end
    return config
