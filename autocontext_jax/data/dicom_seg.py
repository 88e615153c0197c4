"""A label map written as a DICOM Segmentation (SEG) of the DICOM series it was predicted from.

    write_dicom_seg(labels, scan.geometry, "series/", "seg.dcm", class_names, "0.1.0")

For PACS and viewers that read DICOM only. The SEG references every image of the series
(the same study, frame of reference and patient), holds one binary segment per structure
of the model with its SNOMED CT code (pydicom's code dictionary), and one frame per
source slice that a structure touches. Frames follow the source images by position: each
image's ImagePositionPatient is mapped through the scan's own affine to its slice of the
label map, so the order in which the files were read does not matter. Written with
highdicom, an optional extra: `pip install -e ".[dicom]"`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from autocontext_jax.data.atomic import write_atomically
from autocontext_jax.data.errors import DatasetError
from autocontext_jax.data.geometry import Geometry, canonical_to_original

try:  # Optional: only --output_type dicom_seg needs them.
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
except ImportError:  # pragma: no cover - depends on the install
    hd = None

# DICOM's patient coordinates are LPS; the scan's affine is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# SNOMED CT concepts of the model's structures; one not listed is an "Anatomical Structure".
STRUCTURE_CODES = {
    "artery": "Artery",
    "portal_vein": "PortalVein",
    "liver": "Liver",
    "spleen": "Spleen",
    "stomach": "Stomach",
    "gallbladder": "Gallbladder",
    "pancreas": "Pancreas",
}


def _require_highdicom() -> None:
    if hd is None:
        raise DatasetError("--output_type dicom_seg needs highdicom: pip install -e '.[dicom]'")


def structure_code(name: str) -> tuple:
    """(category, type) codes of a structure: Anatomical Structure and its SNOMED CT concept."""
    _require_highdicom()
    concept = STRUCTURE_CODES.get(name)
    kind = getattr(codes.SCT, concept) if concept else codes.SCT.AnatomicalStructure
    return codes.SCT.AnatomicalStructure, kind


def read_series(folder: str | os.PathLike) -> list:
    """The pydicom datasets of the image files in a DICOM series folder."""
    _require_highdicom()
    datasets = []
    for path in sorted(pathlib.Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue  # not a DICOM file (a DICOMDIR's neighbours, notes)
        if "PixelData" in dataset and "ImagePositionPatient" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise DatasetError(f"{folder}: no DICOM image with a position in this folder")
    return datasets


def slice_of(dataset, geometry: Geometry) -> int:
    """The slice (third original axis) of the label map that a source image lies on."""
    position = LPS_TO_RAS @ np.asarray(dataset.ImagePositionPatient, np.float64)
    voxel = np.linalg.solve(
        geometry.original_affine[:3, :3], position - geometry.original_affine[:3, 3]
    )
    return int(round(voxel[2]))


def segment_descriptions(class_names: Sequence[str], software_version: str) -> list:
    """One SegmentDescription per structure (class 1..K-1), numbered as the label map."""
    _require_highdicom()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="autocontext-jax", family=codes.DCM.ArtificialIntelligence, version=software_version
    )
    descriptions = []
    for number, name in enumerate(class_names[1:], start=1):
        category, kind = structure_code(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def write_dicom_seg(
    labels: np.ndarray,
    geometry: Geometry,
    series: str | os.PathLike,
    output: str | os.PathLike,
    class_names: Sequence[str],
    software_version: str,
) -> pathlib.Path:
    """Write the canonical label map `labels` of the series in `series` as a SEG at `output`."""
    _require_highdicom()
    sources = read_series(series)
    original = canonical_to_original(labels, geometry)  # (columns, rows, slices)
    frames = []
    for dataset in sources:
        k = slice_of(dataset, geometry)
        if not 0 <= k < original.shape[2] or original.shape[:2] != (
            dataset.Columns,
            dataset.Rows,
        ):
            raise DatasetError(
                f"{series}: image {dataset.SOPInstanceUID} does not lie on the scan's grid"
            )
        frames.append(original[:, :, k].T)  # DICOM pixels are (rows, columns)
    try:
        segmentation = _segmentation(sources, np.stack(frames), class_names, software_version)
    except ValueError as error:  # highdicom's checks of the source images
        raise DatasetError(f"{series}: cannot make a DICOM SEG of this series ({error})") from error
    output = pathlib.Path(output)
    write_atomically(output, lambda temporary: segmentation.save_as(temporary))
    return output


def _segmentation(sources: list, frames: np.ndarray, class_names: Sequence[str], version: str):
    """The highdicom Segmentation of `frames` (one label map per source image)."""
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, version),
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="autocontext-jax",
        manufacturer_model_name="autocontext-jax",
        software_versions=version,
        device_serial_number="none",
        series_description="autocontext-jax segmentation",
    )
