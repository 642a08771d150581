"""The stable Gadgetron target ``scoremri.gadget.gadget:score_recon`` that sites' stream XMLs and the Dockerfile
name (``<execute name="scoremri.gadget.gadget" target="score_recon" type="python"/>``). The code lives in the
Gadgetron wing, :mod:`scoremri.gadget.gadgetron.external`; this alias only keeps the name working."""
from scoremri.gadget.gadgetron.external import score_recon

__all__ = ["score_recon"]
