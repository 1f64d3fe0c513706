#!/usr/bin/env bash
# Install clrun (editable) into the current Python environment with the test tools and every
# extra the tests use: sweep (Hydra's joblib and submitit launchers, Optuna sweeper), loggers
# (TensorBoard, MLflow), wandb, pretrained (timm, safetensors, huggingface_hub).
# Keeps a torch that is already installed when a torchvision loads beside it (timm needs one);
# otherwise installs the matching pair torch 2.14.1 + torchvision 0.29.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" numpy
fi
"$PY" -m pip install -q -e ".[dev,sweep,loggers,wandb,pretrained]"
