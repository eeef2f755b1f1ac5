"""DICOM readers: datasets in, volumes out (mosaics, single slices, enhanced
multi-frame, Philips PAR/REC), with the geometry, CSA and vendor headers they need."""
