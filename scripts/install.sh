#!/usr/bin/env bash
# Installs peft_fast and everything its tests and examples need (attrs: HF PEFT's CorDA module, the oracle of
# tests/test_corda.py, imports it without declaring it; scipy: HF PEFT's LoraConfig asks for it with LoftQ, in
# tests/test_loftq.py), on a fresh machine (CPU or GPU), at the versions
# in constraints.txt (the ones tested). torch is pinned in the same pip command as the rest, or peft / accelerate /
# bitsandbytes pull a 5.5 GB CUDA torch; on a machine that already has a CUDA torch, set PEFT_FAST_KEEP_TORCH=1
# to leave it (and triton) as they are. Also puts transformers $COMPAT_TRANSFORMERS into .compat/ for the test of
# the newer KV-cache API (tests/test_transformers_compat.py); the main environment keeps the pinned one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
COMPAT_TRANSFORMERS=5.24.0
constraints=(-c constraints.txt)
if [ "${PEFT_FAST_KEEP_TORCH:-0}" = "1" ]; then
  torch_pins=()
  grep -vE "^(torch|triton)==" constraints.txt > .constraints-keep-torch.txt
  constraints=(-c .constraints-keep-torch.txt)
else
  torch_pins=("torch" "triton")
fi
python -m pip install -q "${constraints[@]}" "${torch_pins[@]}" transformers safetensors bitsandbytes accelerate peft \
  pytest pytest-benchmark hypothesis attrs scipy ninja pybind11 numpy matplotlib tqdm setuptools wheel
python -m pip install -q --no-build-isolation --no-deps -e .
compat=".compat/transformers-$COMPAT_TRANSFORMERS"
if [ ! -d "$compat/transformers" ]; then
  python -m pip install -q --no-deps --target "$compat" "transformers==$COMPAT_TRANSFORMERS"
fi
