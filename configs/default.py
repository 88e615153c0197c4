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
    # A folder in the MSD/nnU-Net layout (dataset.json, imagesTr/, labelsTr/), or, when
    # `pairs` lists ((image, label), ...), the folder its relative paths start from.
    config.data.dir = "data/phantom"
    config.data.pairs = ()
    # ((dataset id, model class), ...): unmapped ids become background, or an error with
    # unmapped_labels = "error". Empty: the dataset's ids are the model's classes.
    config.data.label_map = ()
    config.data.unmapped_labels = "background"
    # Leave out a bad case with a warning naming it, instead of stopping.
    config.data.skip_bad_cases = False
    # Preprocessed cases ("" = the dataset folder's name + "_preprocessed", beside it).
    config.data.cache_dir = ""
    config.data.preprocess_workers = 2
    # Voxel size (mm, along R, A, S) that every case is resampled to; () = the median of
    # the training cases (nnU-Net). Images: spline order 1 (linear) or 3 (cubic); labels:
    # linear_argmax (per class, keeps thin vessels) or nearest.
    config.data.target_spacing = ()
    config.data.image_interpolation_order = 1
    config.data.label_interpolation = "linear_argmax"
    # When `dir` is missing or empty, generate `phantom_cases` phantom cases there: always
    # into this default folder, data/phantom; into any other folder only when
    # `generate_phantom` is True, so a misspelt `dir` is an error rather than a phantom.
    config.data.generate_phantom = False
    config.data.phantom_cases = 30
    config.data.num_val_cases = 6
    # Seed of the held-out split, apart from `seed`, so runs of several seeds share one split.
    config.data.split_seed = 0
    # Crop centres: a uniform foreground voxel (`foreground`, the paper), or a voxel of a
    # class drawn uniformly among those present (`class_balanced`: small structures too).
    config.data.centre_sampling = "class_balanced"
    # class_balanced only: one weight per model class (index 0 unused) to oversample some
    # structures, e.g. (0, 2, 2, 1, 1, 1, 1, 2) for vessels and pancreas; () = uniform.
    config.data.class_sampling_weights = ()
    # Edge of the cubic crop, in voxels, that every pyramid level sees.
    config.data.crop_size = 24
    # `window`: the fixed Hounsfield window, then (HU - mean) / std. `foreground_zscore`:
    # nnU-Net's CT scheme, percentiles and moments of the training foreground.
    config.data.normalization = "window"
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
    # 3x3x3 convolution lowering: auto (native on GPU/TPU, depth_folded on CPU) | native |
    # depth_folded | folded. All compute the same function; see autocontext_jax/models/conv.py.
    config.model.conv_impl = "auto"

    config.pyramid = ml_collections.ConfigDict()
    config.pyramid.levels = 2
    # end_to_end (one summed loss, gradients through the context) | stagewise (one summed
    # loss, the context through stop_gradient) | separate (level 1 trained first, then
    # frozen while level 2 trains on its inference-mode predictions, ...) | none (no context).
    config.pyramid.mode = "end_to_end"
    # separate only: the steps of levels 1 .. S-1 in turn, the finest training the rest of
    # train.steps; () splits train.steps equally between the levels.
    config.pyramid.level_steps = ()
    # Context dropout: in training, each example's context is replaced by the uniform 1/K
    # with this probability, so the finer level also learns to segment from its image when
    # the coarser level is wrong (its uniform-context Dice in `autocontext diagnose`).
    # 0: the paper's. 0.2 gave level 2 -3.5 Dice (Holm 1e-06, every organ worse; README), so 0.
    config.pyramid.context_dropout = 0.0
    # Weight of each level's loss in the summed loss of end_to_end and stagewise, coarsest
    # first; () = 1 for every level (the paper). A separate run trains each level alone.
    # (2, 1) gave level 1 +2.2 Dice and level 2 -0.3 (not significant; README), so ().
    config.pyramid.level_loss_weights = ()

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
    # Gamma exp(U(-g, g)) on each example's intensity range, also with `probability`.
    config.augment.gamma = 0.1
    # Spatial augmentation in the input pipeline: one transform per example, one
    # resampling of the region the coarsest level sees (data/augment.py).
    # Off by default: the phantom's random anatomy already varies more than these would,
    # and on a CPU the warp costs as much as the step (configs/paper.py turns them on).
    config.augment.rotation_probability = 0.0
    config.augment.rotation_degrees = 10.0  # about each axis, U(-a, a)
    config.augment.scale_probability = 0.0
    config.augment.scale = 0.1  # zoom by U(1 - a, 1 + a)
    config.augment.translation_probability = 0.0
    config.augment.translation_voxels = 4.0  # shift the centre by U(-a, a) native voxels
    config.augment.elastic_probability = 0.0
    config.augment.elastic_voxels = 2.0  # std of the control-point displacements
    config.augment.elastic_control_points = 4  # per axis, over the coarsest region
    # Where the spatial warp runs: `host` (the Grain workers) | `device` (the host ships
    # raw boxes, the jitted step warps them) | `auto`: device on GPU/TPU when any spatial
    # part is on, host on a CPU (measured faster there, README).
    config.augment.device = "auto"

    config.train = ml_collections.ConfigDict()
    config.train.steps = 1500
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
    # Validation during training: every `every` steps (0: never), the finest level's Dice
    # per class on the first `num_cases` held-out cases, segmented as `predict` does.
    # Each validation of a default phantom case costs about 6 s on a 2-core CPU (and the
    # first one compiles the tiled predictor, which the end-of-run evaluation then
    # reuses): 5 validations of 1 case stay under 10 % of the default job.
    config.eval.every = 300
    config.eval.num_cases = 1
    # Normalised surface Dice counts surface voxels within this distance of the other surface.
    config.eval.nsd_tolerance_mm = 2.0
    return config
