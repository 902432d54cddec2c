# `python prepare.py ...` from a checkout. The code is spikeformer_jax/prepare.py; installed,
# `spikeformer-prepare` or `python -m spikeformer_jax.prepare` runs it from any directory.
from spikeformer_jax import prepare as _prepare

__doc__ = _prepare.__doc__  # what --help prints

if __name__ == '__main__':
  _prepare.run()
