"""From a scan to labels: a trained run, the tiled pyramid, results back on the scan's grid."""

from autocontext_jax.inference.export import ModelFileError, export_model, read_model_file
from autocontext_jax.inference.model import (
    MemberMismatchError,
    Model,
    as_model,
    load_model,
    with_host_lowerings,
)
from autocontext_jax.inference.predict import (
    PredictedFile,
    PredictionJob,
    predict_file,
    predict_jobs,
    predict_paths,
)
from autocontext_jax.inference.pyramid import count_tiles, predict_pyramid
from autocontext_jax.inference.run import (
    CheckpointError,
    Run,
    checkpoint_time,
    default_options,
    load_run,
    run_from_state,
    with_host_lowering,
)
from autocontext_jax.inference.segment import Segmentation, segment
from autocontext_jax.inference.tiling import WEIGHTINGS, TilingOptions, check_options
from autocontext_jax.inference.upsample import upsample_to_native

__all__ = [
    "WEIGHTINGS",
    "CheckpointError",
    "MemberMismatchError",
    "Model",
    "ModelFileError",
    "PredictedFile",
    "PredictionJob",
    "Run",
    "as_model",
    "Segmentation",
    "TilingOptions",
    "check_options",
    "checkpoint_time",
    "count_tiles",
    "default_options",
    "export_model",
    "load_model",
    "load_run",
    "predict_file",
    "predict_jobs",
    "predict_paths",
    "predict_pyramid",
    "read_model_file",
    "run_from_state",
    "segment",
    "upsample_to_native",
    "with_host_lowering",
    "with_host_lowerings",
]
