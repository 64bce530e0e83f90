"""Data path: manifests and labels, images, prompts, tokenizer, examples, grain pipelines.

Submodules are imported explicitly (``from tatar_jax.data import image, manifest``); nothing
heavy is imported here.
"""
