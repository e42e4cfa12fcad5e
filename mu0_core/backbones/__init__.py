"""Backbones (prefix encoders): `tiny` (packaged encoders) and `hf` (a transformers VLM)."""
