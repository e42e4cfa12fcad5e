"""μ0 core: the 3D-trace world model (geometry, B-splines, backbones, trace expert, flow
matching, metrics, checkpoints). Imports only numpy, torch and, lazily, transformers."""

__version__ = "0.1.0"
