"""Qwen2.5-VL in Flax NNX: config, vision tower, decoder, HF checkpoint load/save."""
