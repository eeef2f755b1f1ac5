"""DICOM intake: receiver, folder watcher, CSA reader, geometry and assembler."""
