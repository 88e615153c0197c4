"""The depth ablation on a 2-core CPU: pyramid depth 1, 2 and 3, cross-validated over 3 folds.

    autocontext ablation --config configs/ablation_depth_cpu.py --levels 1,2,3 \
        --modes end_to_end,none --seeds 0,1 --folds 3 --runs_dir runs/ablation_depth_cpu

5 configurations (one U-Net; end_to_end and none at depths 2 and 3) x 3 folds x 2 seeds =
30 runs of 1,200 steps; every one of the 20 phantom cases is scored once per configuration
and seed, by the fold model that held it out, so each test has n = 20 independent cases.

Why these sizes (docs/ablation.md#the-depth-ablation-on-a-cpu has the measurements). The
phantom is the default one (128 x 112 x 96 voxels of 1.5 mm: a 192 x 168 x 144 mm body).
Level 1 of a depth-S pyramid sees crop_size x 2^S native voxels per axis; with crop_size 16
that is 48 mm for one U-Net, 96 mm (half the body's width) for depth 2 and 192 mm (the
whole body, at 12 mm voxels) for depth 3, so only the third level gives the pyramid the
whole-abdomen view that the paper's level 1 has. With the default crop of 24, depth 2
already sees 144 mm, and a third level's 288 mm cube would be four-fifths padding: a
coarser copy, not a new view. A finer phantom (1.0 mm) with crop 24 would give the same
geometry at 3.4 times the cost per step and per evaluated voxel. crop_size 16 is a multiple
of 2^num_poolings = 8; a depth-3 volume is padded to a multiple of 2^3 x 2^3 = 64 voxels.
The number of folds does not change n (every case is scored once whatever k), only the
training cases per fold (13 or 14 of 20) and the number of runs; two seeds are the fewest
that show a seed-to-seed spread. 1,200 steps: measured on fold 0 of 5 folds, a depth-3 pyramid's
finest level reached 59.3 Dice at 600 steps (below its level 2, 65.1) and 81.4 at 1,200
(levels 56.8, 70.9, 81.4); one U-Net 34.1 and 62.8.

Time, measured on 2026-12-06 on this 2-core CPU while shared with other sessions: whole
fold-0 runs of 1,200 steps took 114 s (depth 1), 278 s (depth 2, with its compile) and
402 s (depth 3) at load average 4 to 4.5, so the 30 runs take about 2.4 hours at that load;
the documented CPU ablation config, timed in the same minutes, ran 1.8 to 2.0 times slower
than its idle figure, which puts the grid at 73 to 81 minutes on an otherwise idle 2-core
CPU (5 folds: about 2 hours). Its seed-0 half was run on 2026-12-06: docs/ablation.md,
"The cross-validated depth ablation on the phantom", has its report and times.
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
    config.data.num_folds = 3
    config.data.crop_size = 16
    config.train.steps = 1200
    config.train.checkpoint_every = 400
    config.train.log_every = 20
    config.eval.every = 0  # the folds' held-out cases are evaluated once, at the end
    return config
