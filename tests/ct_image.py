"""A CT image dataset: what a scanner might send to rtsc by mistake (tests of refusal)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_dataset(rng: np.random.Generator) -> Dataset:
    """A small CT Image Storage dataset (a wrong series a scanner might send to rtsc by mistake)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "CT^TEST", "CT0001"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.SliceThickness = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelData = rng.integers(0, 2000, size=(16, 16), dtype=np.int16).tobytes()
    return ds
