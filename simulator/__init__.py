"""Scanner simulator: phantoms with known ground truth, realistic DICOM, C-STORE sender."""
