"""The published μ0 (the paper's release), ported: architecture, preprocessing, strict loader.

``model.py`` is the network, ``preprocess.py`` turns camera inputs into what it reads,
``release.py`` loads a release directory (config.json, model.safetensors,
normalizer_stats.json) with the VLM/DINOv2 configs and tokenizer from local directories.
docs/published-mu0.md says how to get the files and serve them.
"""
