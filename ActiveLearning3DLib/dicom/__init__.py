"""Radiology data in and out: DICOM series as cases, predictions as DICOM SEG, a DICOMweb store.

``series``: image series under a folder -> checked 3D volumes -> NIfTI cases (source UIDs kept).
``seg``: label maps of a case -> DICOM SEG objects that reference its source series (highdicom).
``dicomweb``: pull series (QIDO-RS, WADO-RS) into a project and push SEG objects (STOW-RS), resumable.
"""
