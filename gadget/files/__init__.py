"""The files wing: ISMRMRD raw files in (``rawfile``), images out (``rawfile``, ``preview``), simulated scans
(``simulate``: the ``scoremri simulate`` command) and offline reconstruction (``replay``: ``scoremri replay``,
the Gadgetron chain reproduced in-process)."""
