"""Intake: the DICOM receiver (C-STORE SCP), the folder watcher, replay of
recorded series and the access rules for peers."""
