"""The setting of Roth et al. (2018): S=2, 64^3 crops, width 32 (19.07 M parameters a level).

    python -m autocontext_jax.main --config configs/paper.py --workdir runs/paper

Batch 3 from different volumes, Adam, 20,000 steps. Sized for an accelerator; on a CPU
use it with --dry_run or a few steps. Point `--config.data.dir` at your own dataset.
"""

import pathlib

import ml_collections

from autocontext_jax.config.files import load_config_file


def get_config() -> ml_collections.ConfigDict:
    """Return the paper's configuration."""
    config = load_config_file(pathlib.Path(__file__).with_name("default.py"))
    config.data.dir = "data/phantom"
    config.data.crop_size = 64
    config.model.width = 32
    config.pyramid.levels = 2
    config.pyramid.mode = "end_to_end"
    config.loss.name = "dice"
    config.data.centre_sampling = "foreground"
    config.train.steps = 20_000
    config.train.batch_size = 3
    config.train.learning_rate = 1e-4
    config.train.schedule = "constant"
    config.train.warmup_steps = 0
    config.train.ema_decay = 0.0  # the paper evaluates the trained weights themselves
    config.train.checkpoint_every = 1000
    config.train.log_every = 50
    config.data.worker_count = 4
    # The paper's augmentation: random translations, rotations and elastic deformations.
    config.augment.rotation_probability = 0.2
    config.augment.scale_probability = 0.2
    config.augment.translation_probability = 0.2
    config.augment.elastic_probability = 0.1
    return config
