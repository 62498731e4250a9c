#!/usr/bin/env bash
# The one command a kernel session sends to the GPU (device) machine: install peft_fast over the machine's own CUDA
# torch (building the CUDA extension when csrc/ has sources), then run what the arguments name, in order:
#   tests   the GPU tests (pytest -m gpu; $GPU_TESTS narrows them to some files)          suite   the whole test suite
#   profile scripts/profile_lora.py (per-kernel times, Python overhead, autotuner picks)
#   throw   scripts/probe_cxx_throw.py (toolchain facts; does a C++ throw in an extension reach Python?)
#   probe   scripts/probe_lora_paths.py host (host µs per call of each design at tiny sizes: the enqueue cost)
#   kprobe  scripts/probe_lora_kernels.py $KPROBE (the fused kernels vs the ATen route: host, split, layer, qlayer,
#           pieces, merged, shapes, qgemv, dequant, preround, twopass, tma, reduce, decode, decodek, ranks, once,
#           model, consumer)
#   ncu     Nsight Compute over the fused kernels, each launched once at M8192 (speed of light, occupancy, stalls;
#           $NCU_KERNELS narrows them, default regex:lora_; $NCU_ARGS adds options, e.g. --print-details all for
#           the source lines behind the uncoalesced-access counts; NCU_ONCE=oncedecode: the decode routes at M1, M16)
#   timeline  scripts/probe_timeline.py $TIMELINE (one bench layer step under torch.profiler: GPU idle gaps inside it
#           and the host ops that ran meanwhile, base / PEFT / peft_fast; Chrome traces kept)
#   compile scripts/probe_compile.py $COMPILE_ARGS (--qlora: the QLoRA model; dynamo's recompiles, graph breaks, tok/s)
#   dprobe  scripts/probe_decode.py (decode: host µs per LoRA layer call and its pieces; 1B generate, interleaved)
#   mprof   scripts/profile_model_step.py (which ops the host spends a bench model step issuing, per impl)
#   phases  scripts/profile_model_step.py --phases (syncs a step makes; host issue vs GPU time per phase)
#   qmprof  the same for the QLoRA model case;  cprof  for the 7B consumer QLoRA case, by GPU kernel time
#   ab | qab  scripts/ab_model_step.py [--qlora]: PEFT vs peft_fast model steps interleaved (noisy hosts)
#   layer | qlora | model | decode | consumer | all   that `peft-fast bench` suite (JSON + PNG + table)
#   STEP@route | STEP@noroute   STEP with the node's one-GEMM route from $ROUTE_ROWS rows (default 1024) | off
#   STEP@produce | STEP@noproduce   the route's GEMMs making the low-rank product from $PRODUCE_ROWS rows (default 0)
#                                   | reading the shrink kernel's (PEFT_FAST_ONE_GEMM_PRODUCE)
#   STEP@decodek | STEP@nodecodek   decode (≤ 16 rows, inference) on the one-launch decode kernel | off
#                                   (PEFT_FAST_DECODE_KERNEL)
#   STEP@rankroute   the one-GEMM route up to rank $ROUTE_MAX_RANK (default 64) with the fused kernels on wherever
#                    they apply (PEFT_FAST_ONE_GEMM_MAX_RANK, PEFT_FAST_CUDA_KERNELS=on); e.g. BENCH_ARGS="--only r64"
#                    with layer@rankroute layer: the r64 rows on the route and on auto's ATen route
# bitsandbytes is not installed on the device machine: carry its wheel in .whl/ (device README) for the QLoRA parts.
# Each step is cut off after $STEP_TIMEOUT seconds (default 900), so one slow step leaves time for the rest.
# Default: tests layer. Logs and results go to $OUT (./gpu_out when OUT is unset); a table of the steps (result, wall
# time) ends the output and is kept as $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
PEFT_FAST_REQUIRE_EXTENSION=1 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -30 "$OUT/install.log"; exit 1; }
{ echo "link: $(grep -E -- ' -shared ' "$OUT/install.log" | tail -1 | cut -c1-400)"
  for so in peft_fast/_C*.so; do [ -e "$so" ] && echo "$so defines: $(nm -D --defined-only "$so" | grep -c -E ' (__gxx_personality_v0|__cxa_throw)$') C++ runtime symbols (want 0)"; done
} | tee -a "$OUT/gpu.txt"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
rc=0
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests layer)
summary=()
rows_given="${PEFT_FAST_ONE_GEMM_ROWS:-}" produce_given="${PEFT_FAST_ONE_GEMM_PRODUCE:-}"
decodek_given="${PEFT_FAST_DECODE_KERNEL:-}" kernels_given="${PEFT_FAST_CUDA_KERNELS:-}"
max_rank_given="${PEFT_FAST_ONE_GEMM_MAX_RANK:-}"
for step in "${steps[@]}"; do
  echo "=== $step ($(date +%T))"
  start=$SECONDS prev=$rc rc=0 name=$step
  # STEP@route / STEP@noroute: that step with the node's one-GEMM route from $ROUTE_ROWS rows (default 1024) / off
  # STEP@produce / STEP@noproduce: the route's GEMMs making the low-rank product / reading the shrink kernel's
  if [[ "$step" == *@produce ]]; then export PEFT_FAST_ONE_GEMM_PRODUCE="${PRODUCE_ROWS:-0}"; step=${step%@produce}
  elif [[ "$step" == *@noproduce ]]; then export PEFT_FAST_ONE_GEMM_PRODUCE=off; step=${step%@noproduce}
  elif [ -n "$produce_given" ]; then export PEFT_FAST_ONE_GEMM_PRODUCE="$produce_given"
  else unset PEFT_FAST_ONE_GEMM_PRODUCE; fi
  if [[ "$step" == *@decodek ]]; then export PEFT_FAST_DECODE_KERNEL=on; step=${step%@decodek}
  elif [[ "$step" == *@nodecodek ]]; then export PEFT_FAST_DECODE_KERNEL=off; step=${step%@nodecodek}
  elif [ -n "$decodek_given" ]; then export PEFT_FAST_DECODE_KERNEL="$decodek_given"
  else unset PEFT_FAST_DECODE_KERNEL; fi
  if [[ "$step" == *@rankroute ]]; then
    export PEFT_FAST_ONE_GEMM_MAX_RANK="${ROUTE_MAX_RANK:-64}" PEFT_FAST_CUDA_KERNELS=on; step=${step%@rankroute}
  else
    if [ -n "$max_rank_given" ]; then export PEFT_FAST_ONE_GEMM_MAX_RANK="$max_rank_given"
    else unset PEFT_FAST_ONE_GEMM_MAX_RANK; fi
    if [ -n "$kernels_given" ]; then export PEFT_FAST_CUDA_KERNELS="$kernels_given"; else unset PEFT_FAST_CUDA_KERNELS; fi
  fi
  if [[ "$step" == *@route ]]; then export PEFT_FAST_ONE_GEMM_ROWS="${ROUTE_ROWS:-1024}"; step=${step%@route}
  elif [[ "$step" == *@noroute ]]; then export PEFT_FAST_ONE_GEMM_ROWS=off; step=${step%@noroute}
  elif [ -n "$rows_given" ]; then export PEFT_FAST_ONE_GEMM_ROWS="$rows_given"; else unset PEFT_FAST_ONE_GEMM_ROWS; fi
  case "$step" in
    tests) timeout "$STEP_TIMEOUT" python3 -m pytest -v -m gpu ${GPU_TESTS:-tests} -p no:cacheprovider -p no:logging --tb=short --durations=25 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40 || rc=1 ;;
    profile) timeout "$STEP_TIMEOUT" python3 scripts/profile_lora.py 2>&1 | tee "$OUT/profile.log" || rc=1 ;;
    throw) timeout "$STEP_TIMEOUT" python3 scripts/probe_cxx_throw.py 2>&1 | tee "$OUT/throw.log" || rc=1 ;;
    phases) timeout "$STEP_TIMEOUT" python3 scripts/profile_model_step.py --phases 2>&1 | tee "$OUT/phases.log" | grep -v Warning || rc=1 ;;
    mprof) timeout "$STEP_TIMEOUT" python3 scripts/profile_model_step.py 2>&1 | tee "$OUT/mprof.log" | grep -v Warning || rc=1 ;;
    cprof) timeout "$STEP_TIMEOUT" python3 scripts/profile_model_step.py --consumer 2>&1 | tee "$OUT/cprof.log" | grep -v Warning || rc=1 ;;
    qmprof) timeout "$STEP_TIMEOUT" python3 scripts/profile_model_step.py --qlora 2>&1 | tee "$OUT/qmprof.log" | grep -v Warning || rc=1 ;;
    ab|qab) timeout "$STEP_TIMEOUT" python3 scripts/ab_model_step.py $([ "$step" = qab ] && echo --qlora) 2>&1 | tee "$OUT/$step.log" | grep -v Warning || rc=1 ;;
    kprobe) timeout "$STEP_TIMEOUT" python3 scripts/probe_lora_kernels.py ${KPROBE:-} 2>&1 | tee "$OUT/kprobe.log" | grep -v Warning || rc=1 ;;
    ncu) timeout "$STEP_TIMEOUT" ncu --clock-control none -k "${NCU_KERNELS:-regex:lora_}" ${NCU_ARGS:-} \
           --section SpeedOfLight --section Occupancy \
           --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
           --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum" \
           python3 scripts/probe_lora_kernels.py "${NCU_ONCE:-once}" > "$OUT/ncu.log" 2>&1 || rc=1
         grep -E "lora_|Duration|Cluster|Waves|Grid Size|DRAM Through|L2 Cache Through|Compute \(SM\)|Achieved Occ|Registers Per|Block Limit Sh|inst_executed|stalled_(long|short|barrier|mio|lg|wait|math|not_sel|no_inst|branch|dispatch)" "$OUT/ncu.log" | head -200 ;;
    timeline) timeout "$STEP_TIMEOUT" python3 scripts/probe_timeline.py ${TIMELINE:-} 2>&1 | tee "$OUT/timeline.log" | grep -v Warning || rc=1 ;;
    compile) timeout "$STEP_TIMEOUT" python3 scripts/probe_compile.py ${COMPILE_ARGS:-} 2>&1 | tee "$OUT/compile.log" | grep -v Warning | tail -80 || rc=1 ;;
    dprobe) timeout "$STEP_TIMEOUT" python3 scripts/probe_decode.py 2>&1 | tee "$OUT/dprobe.log" | grep -v Warning || rc=1 ;;
    probe) timeout "$STEP_TIMEOUT" python3 scripts/probe_lora_paths.py host 2>&1 | tee "$OUT/probe.log" | grep -v Warning || rc=1 ;;
    suite) timeout "$STEP_TIMEOUT" python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_all.log" | tail -5 || rc=1 ;;
    layer|qlora|model|decode|consumer|all)
      echo "=== $name" >> "$OUT/bench.log"
      timeout "$STEP_TIMEOUT" peft-fast bench --suite "$step" --out "$OUT/bench_${name/@/_}" --no-progress \
        ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" | grep -v "^\s*$" | tail -40 || rc=1 ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
  summary+=("$(printf '%-12s %-7s %5d s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAILED)" $((SECONDS - start)))")
  [ "$prev" -gt "$rc" ] && rc=$prev
done
# (a step cut off by STEP_TIMEOUT shows as FAILED; its log under $OUT says where it stopped)
# the bench folders (JSON + PNG each) as one archive: the device returns at most 8 files
if ls -d "$OUT"/bench_*/ >/dev/null 2>&1; then
  (cd "$OUT" && tar czf bench_results.tgz bench_*/ && rm -rf bench_*/)
fi
{ echo "=== summary: step, result, wall time (logs and results in $OUT)"; printf '%s\n' "${summary[@]}"; } \
  | tee "$OUT/summary.txt"
exit $rc
