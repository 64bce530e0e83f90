"""Model implementations (Flax NNX): :mod:`.layers` (building blocks shared by every tower) and
:mod:`.qwen2_5_vl`."""
