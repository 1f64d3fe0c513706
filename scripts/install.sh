#!/usr/bin/env bash
# Install clrun (editable, with the test tools, the sweep extra: Hydra's joblib and submitit
# launchers and Optuna sweeper, which the sweep tests use, and the loggers and wandb extras,
# which the logger tests use) into the current Python environment.
# Keeps a torch that is already installed; otherwise installs torch 2.13.0 (on a machine with
# the local CPU wheel, that one: no CUDA packages are pulled in).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0" numpy
fi
"$PY" -m pip install -q -e ".[dev,sweep,loggers,wandb]"
