#!/usr/bin/env bash
# The GPU check in one command, for a machine without network (the lent H100 /
# H200: Python 3.12, jax 0.11.x, flax, optax, orbax; no ml_collections, grain
# or tensorflow-datasets). What it lacks is installed from wheels in .whl/,
# made beforehand on a machine with network:
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl ml_collections absl-py
# Results: $OUT (the device tool's folder) or benchmarks/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import ml_collections' 2>/dev/null; then
  python -m pip install -q --no-index --find-links .whl ml_collections absl-py
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec timeout 470 python benchmarks/gpu_check.py "$@"
