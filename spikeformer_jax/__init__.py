"""spikeformer_jax: spiking vision transformers in JAX and Flax NNX."""

__version__ = '0.1.0'
