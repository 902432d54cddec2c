# `python sweep.py ...` from a checkout. The code is spikeformer_jax/sweep.py; installed,
# `spikeformer-sweep` or `python -m spikeformer_jax.sweep` runs it from any directory.
from spikeformer_jax import sweep as _sweep

__doc__ = _sweep.__doc__  # what --help prints

if __name__ == '__main__':
  _sweep.run()
