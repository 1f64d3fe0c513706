#!/usr/bin/env bash
# Regenerates the example sweep report shown in the README (Split MNIST, naive vs replay, 2 seeds)
# and copies its plots to scripts/examples/.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=outputs/example_sweep
clrun -m strategy=naive,replay seed=0,1 strategy.epochs=1 hydra.sweep.dir="$sweep"
clrun-report "$sweep"
cp "$sweep/final_acc.png" "$sweep/acc_curves.png" scripts/examples/
