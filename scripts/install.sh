#!/usr/bin/env bash
# Installs peft_fast and everything its tests and examples need, on a fresh machine (CPU or GPU).
# torch is pinned in the same pip command as the rest, or peft / accelerate / bitsandbytes pull a 5.5 GB CUDA torch;
# on a machine that already has a CUDA torch, set PEFT_FAST_KEEP_TORCH=1 to leave it as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${PEFT_FAST_KEEP_TORCH:-0}" = "1" ]; then
  torch_pins=()
else
  torch_pins=("torch==2.13.0" "triton==3.7.1")
fi
python -m pip install -q "${torch_pins[@]}" transformers safetensors bitsandbytes accelerate peft pytest \
  pytest-benchmark ninja pybind11 numpy matplotlib tqdm setuptools wheel
python -m pip install -q --no-build-isolation --no-deps -e .
