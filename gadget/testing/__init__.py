"""Test and benchmark support, not product code: ``harness`` plays Gadgetron's side of the external-language
wire against a real ``python -m gadgetron`` child or a running ``scoremri serve``; ``gadgetron_server`` runs the
real Gadgetron server and client; ``grappa`` runs Gadgetron's generic GRAPPA chain on a simulated scan and scores
it; ``bart`` wraps the BART command line, the independent reference of the baselines. Nothing in the product
imports this package."""
