"""The MRD streaming wing (python-ismrmrd-server's protocol; Siemens FIRE / OpenRecon; gadgetron_ismrmrd_client):
``scoremri serve --protocol mrd``. Raw readouts arrive and are buffered as the Gadgetron chain does
(:func:`scoremri.gadget.gadgetron.chain.raw_chain`, the chain replay runs), the buffers go to the shared slice
orchestrator (:mod:`scoremri.gadget.core`), images and TEXT lines go back.

- :mod:`.server`: the ScanProtocol (one scan, message by message; errors as ``ERR`` TEXT + CLOSE);
- :mod:`.config`: what the config messages mean (names never paths, XML / YAML / JSON texts, JSON parameters);
- :mod:`.wire`: the framing, with limits on every length.
"""
