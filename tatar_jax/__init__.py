"""tatar-jax: a JAX/Flax reimplementation of TATAR (arXiv 2603.19779).

Submodules are imported explicitly (``from tatar_jax import rewards``); importing the package
itself pulls in nothing heavy.
"""

__version__ = "0.1.0"
