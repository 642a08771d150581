"""The Gadgetron wing: what speaks Gadgetron's external-language interface, and Gadgetron's own chain
reproduced for raw readouts (replay, the MRD server).

- ``external.py``: the gadget (``score_recon``, execute mode; the XML target ``scoremri.gadget.gadget`` aliases
  it), its fail-fast socket, ERROR + CLOSE on every failure, ``<configuration>`` properties -> ReconConfig.
- ``connect.py``: connect mode as a protocol of ``scoremri serve``.
- ``pipeline.py``: a Gadgetron stream XML -> the properties replay mirrors.
- ``preprocess.py``: NoiseAdjustGadget and RemoveROOversamplingGadget.
- ``buffers.py``: AcquisitionAccumulateTriggerGadget + BucketToBufferGadget -> ReconData.
- ``startup.py``: the start-up patch of gadgetron-python (installed as ``scoremri-gadgetron.pth``): a closed
  socket ends ``python -m gadgetron`` instead of spinning; a worker started without a target gets ours.
"""
