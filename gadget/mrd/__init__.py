"""The MRD streaming wing (python-ismrmrd-server's protocol, Siemens FIRE / OpenRecon): a protocol of
``scoremri serve`` that receives raw readouts, buffers them as the Gadgetron chain does
(:mod:`scoremri.gadget.gadgetron.preprocess`, :mod:`scoremri.gadget.gadgetron.buffers`) and hands the buffers
to the shared slice orchestrator (:mod:`scoremri.gadget.core`). Not built yet."""
