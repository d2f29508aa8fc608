"""Apex model (configuration + modeling), installed as ``apex_hf.modeling``."""
