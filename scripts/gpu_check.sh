#!/usr/bin/env bash
# The one command a kernel session sends to the GPU (device) machine: install peft_fast over the machine's own CUDA
# torch, build the CUDA extension when csrc/ has sources, run the GPU tests and then the whole suite there.
# Logs go to $OUT (or ./gpu_out when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -30 "$OUT/install.log"; exit 1; }
rc=0
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" || rc=1
python3 -m pytest -q tests -x 2>&1 | tee "$OUT/pytest_all.log" | tail -5 || rc=1
exit $rc
