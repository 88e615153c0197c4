"""Default run: a two-level pyramid trained on the generated phantom, sized for a laptop CPU.

    python -m autocontext_jax.main --config configs/default.py --workdir runs/default

Any field can be overridden on the command line, e.g. `--config.pyramid.levels=3`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the default configuration."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # A folder in the MSD/nnU-Net layout (dataset.json, imagesTr/, labelsTr/).
    config.data.dir = "data/phantom"
    # When `dir` is missing or empty, generate this many phantom cases there (0: never).
    config.data.phantom_cases = 30
    config.data.num_val_cases = 6
    # Seed of the held-out split, apart from `seed`, so runs of several seeds share one split.
    config.data.split_seed = 0
    # Crop centres: a uniform foreground voxel (`foreground`, the paper), or a voxel of a
    # class drawn uniformly among those present (`class_balanced`: small structures too).
    config.data.centre_sampling = "class_balanced"
    # Edge of the cubic crop, in voxels, that every pyramid level sees.
    config.data.crop_size = 24
    # Hounsfield window, then (HU - mean) / std.
    config.data.intensity_clip = (-1000.0, 1000.0)
    config.data.intensity_mean = 40.0
    config.data.intensity_std = 200.0
    # Intensity of everything outside the scan (air).
    config.data.pad_value_hu = -1000.0
    # Grain: worker processes (0 = in the training process) and reader threads.
    config.data.worker_count = 0
    config.data.num_threads = 2

    config.model = ml_collections.ConfigDict()
    config.model.width = 8
    config.model.num_poolings = 3
    config.model.in_channels = 1
    config.model.num_classes = 8
    config.model.compute_dtype = "float32"
    config.model.bn_momentum = 0.9
    # 3x3x3 convolution lowering: auto (depth_folded on CPU, native on GPU/TPU) | native |
    # depth_folded. All compute the same function; see autocontext_jax/models/conv.py.
    config.model.conv_impl = "auto"

    config.pyramid = ml_collections.ConfigDict()
    config.pyramid.levels = 2
    # end_to_end | stagewise (context through stop_gradient) | none (no context).
    config.pyramid.mode = "end_to_end"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "dice_ce"  # dice (the paper's Eq. 1) | dice_ce
    # Average the Dice over all K classes (the paper) or over the K-1 structures only.
    config.loss.dice_background = True

    # Intensity augmentation on the device, per example, each with `probability`.
    config.augment = ml_collections.ConfigDict()
    config.augment.probability = 0.5
    config.augment.intensity_scale = 0.05  # multiply by U(1 - a, 1 + a)
    config.augment.intensity_shift = 0.05  # add U(-b, b), in normalised units
    config.augment.noise_std = 0.05  # add N(0, U(0, s)^2) noise

    config.train = ml_collections.ConfigDict()
    config.train.steps = 600
    config.train.batch_size = 2
    config.train.learning_rate = 6e-3
    # constant | cosine (linear warm-up, then cosine decay to final_lr_fraction).
    config.train.schedule = "cosine"
    config.train.warmup_steps = 20
    config.train.final_lr_fraction = 0.05
    # Evaluate an exponential moving average of the parameters (0: the last parameters).
    config.train.ema_decay = 0.99
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 3
    config.train.log_every = 10

    config.eval = ml_collections.ConfigDict()
    # Evaluate the held-out cases at the end of training.
    config.eval.at_end = True
    # Normalised surface Dice counts surface voxels within this distance of the other surface.
    config.eval.nsd_tolerance_mm = 2.0
    return config
