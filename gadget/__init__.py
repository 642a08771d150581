"""The gadget layer: every way in and out of the reconstruction, a wing per protocol (ARCHITECTURE.md).

- ``gadgetron/``: Gadgetron's external-language gadget (execute mode), its connect mode for ``serve``, the
  stream-XML properties, and Gadgetron's chain before our gadget (NoiseAdjust, RemoveROOversampling,
  AcquisitionAccumulateTrigger + BucketToBuffer) reproduced for raw readouts.
- ``mrd/``: the MRD streaming protocol of FIRE / OpenRecon sites.
- ``files/``: ISMRMRD raw and image files, previews, ``simulate``, offline ``replay``.
- ``core.py``: the one slice orchestrator every wing calls; ``images.py``: images and their headers;
  ``server.py``: the long-lived server the streaming wings share; ``cli.py``: the one command line.
- ``testing/``: Gadgetron's side of the wire and the BART reference, for tests and benchmarks only.

Decodes, whitens once, orchestrates, encodes: no math here (that is ``recon/``).
"""
