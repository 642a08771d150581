"""Test and benchmark support, not product code: ``harness`` plays Gadgetron's side of the external-language
wire against a real ``python -m gadgetron`` child or a running ``scoremri serve``; ``bart`` wraps the BART
command line, the independent reference of the baselines. Nothing in the product imports this package."""
