"""DICOM Segmentations of a DICOM series: every frame against the label map, on the series grid."""

import nibabel as nib
import numpy as np
import pytest
from conftest import run_autocontext

# The oblique, anisotropic series the predict tests read.
from test_predict import _dicom_series

try:
    import highdicom as hd
    import pydicom
    import SimpleITK as sitk  # noqa: N813
except ImportError:
    hd = None

from autocontext_jax.data.dicom_seg import write_dicom_seg
from autocontext_jax.data.labels import class_names
from autocontext_jax.data.nifti import write_label_map
from autocontext_jax.data.scans import read_any_scan

pytestmark = pytest.mark.skipif(hd is None, reason="needs highdicom (pip install -e .[dicom])")


def check_seg_against_label_map(seg_path, nifti_path, series):
    """Every source slice's frames equal the NIfTI label map there; geometry is the series'."""
    seg = hd.seg.segread(seg_path)
    sources = {}
    for path in sorted(series.iterdir()):
        dataset = pydicom.dcmread(path)
        sources[dataset.SOPInstanceUID] = dataset
    names = class_names(8)
    assert [seg.get_segment_description(n).segment_label for n in range(1, 8)] == list(names[1:])
    liver = seg.get_segment_description(3).segmented_property_type
    assert (liver.value, liver.scheme_designator) == ("10200004", "SCT")
    assert seg.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    series_uid = next(iter(sources.values())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    # The label map as ITK reads it (LPS index space), independent of the writer's mapping.
    image = sitk.ReadImage(str(nifti_path))
    labels = sitk.GetArrayFromImage(image)  # (slices, rows, columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    checked = 0
    for uid, dataset in sources.items():
        index = image.TransformPhysicalPointToIndex(
            [float(v) for v in dataset.ImagePositionPatient]
        )
        expected = labels[index[2]]
        assert index[:2] == (0, 0)
        found = seg.get_pixels_by_source_instance(
            [uid], combine_segments=True, assert_missing_frames_are_empty=True
        )[0]
        np.testing.assert_array_equal(found, expected)
        np.testing.assert_allclose(orientation, dataset.ImageOrientationPatient, atol=1e-5)
        np.testing.assert_allclose(measures.PixelSpacing, dataset.PixelSpacing, atol=1e-5)
        checked += 1
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(position, sources[uid].ImagePositionPatient, atol=1e-4)
    assert checked == len(sources) == labels.shape[0]


def test_a_label_map_written_as_seg_reads_back_frame_for_frame(tmp_path):
    _dicom_series(tmp_path / "series")
    scan = read_any_scan(tmp_path / "series")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=scan.image.shape).astype(np.uint8)
    labels[..., :3] = 0  # slices without any structure: frames left out, read back as empty
    labels[labels == 6] = 0  # a structure absent everywhere keeps its segment description
    write_label_map(labels, scan.geometry, tmp_path / "labels.nii.gz")
    write_dicom_seg(
        labels, scan.geometry, tmp_path / "series", tmp_path / "seg.dcm", class_names(8), "test"
    )
    check_seg_against_label_map(
        tmp_path / "seg.dcm", tmp_path / "labels.nii.gz", tmp_path / "series"
    )


@pytest.mark.slow
def test_predict_writes_a_seg_beside_the_label_map_of_a_dicom_series(tiny_run, tmp_path):
    _dicom_series(tmp_path / "series")
    output = tmp_path / "out" / "series.nii.gz"
    result = run_autocontext(
        "predict", f"--workdir={tiny_run}", f"--input={tmp_path / 'series'}",
        f"--output={output}", "--output_type=dicom_seg",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.parent.iterdir()) == ["series.dcm", "series.nii.gz"]
    assert nib.load(output).shape == (33, 40, 19)
    check_seg_against_label_map(output.parent / "series.dcm", output, tmp_path / "series")
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.load(output), scan)
    result = run_autocontext(
        "predict", f"--workdir={tiny_run}", f"--input={scan}",
        f"--output={tmp_path / 'x.nii.gz'}", "--output_type=dicom_seg",
    )  # fmt: skip
    assert result.returncode == 1 and "needs a DICOM series folder" in result.stderr
