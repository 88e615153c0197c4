"""The real TotalSegmentator example CT, its ids mapped onto the paper's 7 structures.

    python -m autocontext_jax.main --config configs/totalseg_example.py --workdir runs/totalseg

One small case (122 x 101 x 30 voxels of 3 mm), a smoke test and a demo of real data:
preprocessing (cached in data/totalseg_example_preprocessed), label remapping, a few
training steps on a CPU in a minute or two. There is no held-out case, so no evaluation.
"""

import pathlib

import ml_collections

from autocontext_jax.config.files import load_config_file
from autocontext_jax.data.labels import TOTALSEGMENTATOR_TO_PAPER


def _example_dir() -> pathlib.Path:
    # The shared folder sits beside the main checkout; worktrees are one level deeper.
    repo = pathlib.Path(__file__).resolve().parents[1]
    for root in (repo.parent, repo.parent.parent):
        candidate = root / "shared" / "data" / "totalseg_example"
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "data" / "totalseg_example"


def get_config() -> ml_collections.ConfigDict:
    """Return the configuration of the TotalSegmentator example."""
    config = load_config_file(pathlib.Path(__file__).with_name("default.py"))
    config.data.dir = str(_example_dir())
    config.data.pairs = (("ct.nii.gz", "labels_totalsegmentator.nii.gz"),)
    # TotalSegmentator v2 "total" ids of the paper's structures (also predict's preset).
    config.data.label_map = TOTALSEGMENTATOR_TO_PAPER
    config.data.cache_dir = "data/totalseg_example_preprocessed"
    config.data.phantom_cases = 0
    config.data.num_val_cases = 0
    config.data.normalization = "foreground_zscore"
    config.data.crop_size = 16
    config.model.width = 4
    config.model.num_poolings = 2
    config.train.steps = 20
    config.train.batch_size = 2
    config.train.warmup_steps = 2
    config.train.checkpoint_every = 10
    config.train.log_every = 5
    config.eval.at_end = False
    return config
