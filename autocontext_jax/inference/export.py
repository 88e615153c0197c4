"""A trained model in one file: what inference needs of one or more runs, in a zip.

    export_model(load_model(["runs/fold0", "runs/fold1"]).members, "model.zip")
    members = read_model_file("model.zip")                    # one Run per member

The file holds, per member (`member_0/`, `member_1/`, ...), the variables the run
evaluates (the parameter average when it trained with one, and the BatchNorm
statistics) as numpy arrays (`variables.npz`, read without pickle), its config.json,
plan.json, label names and environment record; `manifest.json` names the package
version that wrote it and the SHA-256 of every other file. Nothing else of the workdir
(optimiser state, other checkpoints, data-loader state, logs) is needed to predict, so
nothing else goes in. Reading checks the digests, the package's major version and the
variables' shapes against the model each config builds: a damaged or foreign file is one
line naming it, never a traceback.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pathlib
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from autocontext_jax import __version__
from autocontext_jax.config import schema
from autocontext_jax.data.atomic import write_atomically
from autocontext_jax.data.plan import RUN_PLAN_FILE, Plan
from autocontext_jax.inference.run import CheckpointError, Run
from autocontext_jax.models import build_pyramid
from autocontext_jax.models.init import abstract_variables
from autocontext_jax.runtime import parallel
from autocontext_jax.runtime.checkpointing import CONFIG_FILE
from autocontext_jax.runtime.environment import ENVIRONMENT_FILE

MANIFEST = "manifest.json"
FORMAT = "autocontext-model"
FORMAT_VERSION = 1
VARIABLES = "variables.npz"
LABELS = "labels.json"
MODEL_SUFFIX = ".zip"
# The separator of a variable's path in its .npz key (flax names hold none).
KEY_SEPARATOR = "/"


class ModelFileError(CheckpointError):
    """A model file is missing, damaged or incompatible; the message names it."""


def is_model_file(path: pathlib.Path) -> bool:
    """Whether `path` is a file given as a model (not a workdir folder)."""
    return path.is_file() or (not path.exists() and path.suffix == MODEL_SUFFIX)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _variables_bytes(variables: dict[str, Any]) -> bytes:
    """The variables as an uncompressed .npz: one array per flattened path, exact values."""
    flat = flax.traverse_util.flatten_dict(jax.device_get(variables), sep=KEY_SEPARATOR)
    stream = io.BytesIO()
    np.savez(stream, **{key: np.asarray(value) for key, value in flat.items()})
    return stream.getvalue()


def member_files(run: Run) -> dict[str, bytes]:
    """The files of one member of a model file, by name within its member folder."""
    if not run.workdir.is_dir():
        raise ModelFileError(f"{run.workdir}: export reads training runs' folders, not a file")
    environment = run.workdir / ENVIRONMENT_FILE
    labels = {
        "classes": list(run.class_names),
        "label_map": [list(pair) for pair in run.label_map],
        "unmapped_labels": run.unmapped_labels,
    }
    return {
        CONFIG_FILE: (run.workdir / CONFIG_FILE).read_bytes(),
        RUN_PLAN_FILE: (json.dumps({"plan": run.plan.to_json()}, indent=1) + "\n").encode(),
        LABELS: (json.dumps(labels, indent=1) + "\n").encode(),
        VARIABLES: _variables_bytes(run.variables),
        ENVIRONMENT_FILE: environment.read_bytes() if environment.is_file() else b"",
    }


def export_model(runs: Sequence[Run], output: str | os.PathLike) -> None:
    """Write the trained runs `runs` (loaded from their workdirs) as one model file `output`.

    The caller checks that the members agree (`Model` does, `autocontext export` builds
    one); the file appears whole or not at all.
    """
    output = pathlib.Path(output)
    files: dict[str, bytes] = {}
    members = []
    for index, run in enumerate(runs):
        name = f"member_{index}"
        members.append({"name": name, "workdir": str(run.workdir), "step": run.step})
        for file_name, data in member_files(run).items():
            files[f"{name}/{file_name}"] = data
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "members": members,
        "sha256": {name: _digest(data) for name, data in files.items()},
    }

    def write(temporary: pathlib.Path) -> None:
        # Stored, not deflated: float weights barely compress, and storing keeps reads fast.
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=1) + "\n")
            for name, data in files.items():
                archive.writestr(name, data)

    write_atomically(output, write)


def _major(version: str) -> str:
    return version.split(".")[0]


def _read_all(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, every other file's bytes) of a model file, its digests checked."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file (autocontext export writes one)")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise ModelFileError(f"{path}: not a model file of autocontext export")
            names = manifest["sha256"]
            files = {name: archive.read(name) for name in names}
    except ModelFileError:
        raise
    # A truncated or altered zip fails in the reader (no central directory, a bad CRC,
    # a header that disagrees with the directory, a name that is not there).
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        KeyError,
        TypeError,
        ValueError,
        NotImplementedError,
    ) as error:
        raise ModelFileError(
            f"{path}: damaged or not a model file ({type(error).__name__}: {error})"
        ) from error
    for name, data in files.items():
        if _digest(data) != names[name]:
            raise ModelFileError(f"{path}: {name} does not match its SHA-256 in the manifest")
    written_by = str(manifest.get("package_version", "?"))
    if _major(written_by) != _major(__version__):
        raise ModelFileError(
            f"{path}: written by autocontext-jax {written_by}; this is {__version__}, "
            "another major version: export it again with this version"
        )
    return manifest, files


def _member_run(path: pathlib.Path, name: str, step: int, files: dict[str, bytes]) -> Run:
    """The Run of member `name` of the model file `path`."""
    where = f"{path}: {name}"
    try:
        config = ml_collections.ConfigDict(json.loads(files[f"{name}/{CONFIG_FILE}"]))
        config, _ = schema.migrate(config)
        model = build_pyramid(config)
        plan = Plan.from_json(json.loads(files[f"{name}/{RUN_PLAN_FILE}"])["plan"])
        arrays = np.load(io.BytesIO(files[f"{name}/{VARIABLES}"]), allow_pickle=False)
        flat = {key: arrays[key] for key in arrays.files}
    except (KeyError, ValueError, TypeError, AttributeError, OSError, schema.ConfigError) as error:
        raise ModelFileError(f"{where}: unreadable ({type(error).__name__}: {error})") from error
    expected = flax.traverse_util.flatten_dict(abstract_variables(model), sep=KEY_SEPARATOR)
    if set(flat) != set(expected):
        different = sorted(set(flat) ^ set(expected))[:3]
        raise ModelFileError(
            f"{where}: its variables are not those of the model its config builds ({different})"
        )
    for key, spec in expected.items():
        if flat[key].shape != spec.shape or flat[key].dtype != spec.dtype:
            raise ModelFileError(
                f"{where}: {key} is {flat[key].dtype}{list(flat[key].shape)}, the model its "
                f"config builds expects {spec.dtype}{list(spec.shape)}"
            )
    variables = flax.traverse_util.unflatten_dict(flat, sep=KEY_SEPARATOR)
    # Replicated over the devices, as load_run restores a checkpoint.
    variables = jax.device_put(variables, parallel.replicated(parallel.make_mesh()))
    return Run(path.absolute(), config, model, variables, step, plan)


def read_model_file(path: str | os.PathLike) -> list[Run]:
    """Every member of the model file at `path`, as Runs; ModelFileError when it is unusable."""
    path = pathlib.Path(path)
    manifest, files = _read_all(path)
    try:
        members = [(str(m["name"]), int(m["step"])) for m in manifest["members"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: its manifest lists no members ({error})") from error
    if not members:
        raise ModelFileError(f"{path}: its manifest lists no members")
    return [_member_run(path, name, step, files) for name, step in members]


def model_file_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a model file (package version, members, digests), checked."""
    manifest, _ = _read_all(pathlib.Path(path))
    return manifest
