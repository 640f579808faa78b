"""BalancedDPO in JAX/Flax.

Importing the package is cheap: submodules pull in JAX, Flax or Grain themselves,
so `bdpo_jax.schema` stays usable from the PyTorch preprocessing side.
"""

__version__ = "0.1.0"
