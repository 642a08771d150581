"""Learned samplers, one module each: ``pc`` (the paper's predictor-corrector) and ``fast`` (DDS-style with a
CCDF warm start, the default); ``common`` holds what they share. Each sampler registers itself with
``recon.methods.register_method``; the registry imports every module of this package, so a new sampler is one
new file here (ARCHITECTURE.md, "Adding a sampler")."""
