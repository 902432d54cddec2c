# `python eval.py ...` from a checkout. The code is spikeformer_jax/eval.py; installed,
# `spikeformer-eval` or `python -m spikeformer_jax.eval` runs it from any directory.
from spikeformer_jax import eval as _eval

__doc__ = _eval.__doc__  # what --help prints

if __name__ == '__main__':
  _eval.run()
