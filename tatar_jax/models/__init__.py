"""Model implementations (Flax NNX)."""
