"""DICOM input (pydicom) for `scoremri simulate` and `scoremri train`: pixels survive the round trip."""
from __future__ import annotations

from pathlib import Path

import numpy as np


import pydicom  # noqa: F401  (in the [train] and [test] extras)


def _write_dicom(path: Path, img: np.ndarray) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = img.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_reaches_simulate_and_training(tmp_path, dipy_t1):
    from scoremri.gadget.files.simulate import load_image
    from scoremri.model.data import load_slices

    img = np.round(dipy_t1 * 4000).astype(np.uint16)
    path = tmp_path / "t1.dcm"
    _write_dicom(path, img)
    sim = load_image(path)
    assert sim.shape == (1, *img.shape)
    np.testing.assert_allclose(sim[0], img / img.max(), atol=1e-6)
    train = load_slices(path, min_fill=0.0)
    assert len(train) >= 1 and train[0].shape[-2:] == img.shape
    np.testing.assert_allclose(train[0] / train[0].max(), img / img.max(), atol=1e-6)
