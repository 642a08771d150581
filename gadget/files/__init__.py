"""The files wing: ISMRMRD raw files in (``rawfile``), images out (``rawfile``: ISMRMRD; ``dicom``: DICOM MR
series; ``nifti``: NIfTI volumes; ``preview``: labelled PNGs; ``compare``: zero-filled | SENSE | sent | std |
difference pictures; all placed in the patient by ``geometry``), simulated scans (``simulate``: the
``scoremri simulate`` command) and offline reconstruction (``replay``: ``scoremri replay``, the Gadgetron
chain reproduced in-process)."""
