"""mellama-jax: Me-LLaMA (medical LLaMA-2) training, conversion and evaluation in JAX/Flax."""

__version__ = "0.1.0"
