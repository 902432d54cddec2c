# `python train.py ...` from a checkout. The code is spikeformer_jax/train.py; installed,
# `spikeformer-train` or `python -m spikeformer_jax.train` runs it from any directory.
from spikeformer_jax import train as _train

__doc__ = _train.__doc__  # what --help prints

if __name__ == '__main__':
  _train.run()
