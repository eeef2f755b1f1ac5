"""`rtsc verify`: the check a site runs once on its own phantom series before trusting rtsc.

:mod:`rtsc.verify.folder` runs a folder of DICOM files through rtsc's own assembler
(what `rtsc run` would make of them) and checks each series (:mod:`rtsc.verify.checks`),
against dcm2niix's conversion of the same files where dcm2niix is installed
(:mod:`rtsc.verify.dcm2niix`); :mod:`rtsc.verify.listen` runs the real receiver, times
the arrival of a series sent from the console, then checks its archived files the same
way; :mod:`rtsc.verify.report` prints the table and writes the JSON.
"""
