#!/usr/bin/env bash
# Every GPU check in stages, for a lent GPU (the device tool). Stages, in the order one lease runs them:
#   prep         in the background (setsid, CPU only): real-size random checkpoint + ONNX export in $WORK (PREP_ONNX=0: none)
#   torch        = doctor checks unit bench: what auto picks; correctness (backends, attention, bf16 vs fp32,
#                CUDA graphs); unit tests on CUDA (UNIT_TESTS, UNIT_SECONDS); bench (BENCH_BATCHING=both|arrival|sorted)
#   serve-torch  serve_bench.py against our server, PyTorch bf16 on CUDA (needs .whl: fastapi, uvicorn, pydantic)
#   onnx         ORT CUDA fp16 against PyTorch CUDA (needs onnxruntime-gpu: ../shared/device/ort-gpu-parts.sh)
#   serve-onnx   serve_bench.py against our server on ORT CUDA fp16
#   run(command="bash benchmarks/gpu_check.sh prep torch serve-torch", carry=[".whl", ".ortgpu/part-aa"])
# With no stage named it runs torch, then onnx if onnxruntime-gpu is importable. Only what the GPU image
# has is needed (torch, transformers, triton, tokenizers, pytest): the package goes on PYTHONPATH under
# its installed names. Results land in $OUT (the device tool's folder) or benchmarks/out: copy the
# tables into benchmarks/RESULTS.md with the card's name and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
work=${WORK:-/tmp/nomic-gpu}
mkdir -p "$out" "$work"
site=/tmp/nomic-site
mkdir -p "$site"
for pkg in modeling conversion files inference cli training serving; do ln -sfn "$PWD/$pkg" "$site/nomic_moe_$pkg"; done
if [ -d .whl ] && [ ! -e /tmp/whl-site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/whl-site .whl/*.whl \
    && touch /tmp/whl-site/.done
fi
[ -d /tmp/ortsite ] && export PYTHONPATH="/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/whl-site ] && export PYTHONPATH="/tmp/whl-site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NOMIC_MOE_CLI="python3 -m nomic_moe_cli"  # serve_bench.py starts our server with it
status=0
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(torch)
  python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null \
    && stages=(torch prep-wait onnx)
fi

has_ort_cuda() {
  python3 -c "import onnxruntime as o, sys; o.preload_dlls(); sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"
}

wait_prep() {  # $1: the file that prep's step writes last
  local deadline=$((SECONDS + ${2:-300}))
  while [ ! -e "$1" ] && [ $SECONDS -lt $deadline ]; do
    grep -q '^PREP FAILED' "$work/prep.log" 2>/dev/null && break
    sleep 2
  done
  cp "$work/prep.log" "$out/prep.txt" 2>/dev/null
  [ -e "$1" ] || { echo "prep did not write $1 in time: see prep.txt"; return 1; }
}

for stage in "${stages[@]}"; do
  case $stage in
  prep)
    echo "== prep: real-size random checkpoint and its ONNX export, on the CPU, in the background ($work)"
    if [ ! -e "$work/prep.log" ]; then
      CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=8 setsid taskset -c 8-15 bash -c "
        date -u; python3 -m nomic_moe_cli synth $work/src --real-size \
          && python3 -m nomic_moe_cli convert $work/src $work/model && touch $work/model.done && date -u || { echo PREP FAILED; exit 1; }
        [ \"\${PREP_ONNX:-1}\" = 1 ] || exit 0
        python3 -m nomic_moe_cli export-onnx $work/model --exporter torch --variants model,fp16 \
          && touch $work/onnx.done && date -u || echo PREP FAILED" >"$work/prep.log" 2>&1 </dev/null &
    fi ;;
  torch) bash "$0" doctor checks unit bench || status=1 ;;
  doctor)
    { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
      echo "== doctor: what auto picks on this GPU, and the kernels compiled for it"
      timeout 90 python3 -m nomic_moe_cli doctor --dtype bfloat16 --compile; timeout 40 python3 -m nomic_moe_cli doctor --dtype float16; } 2>&1 | tee "$out/gpu_env.txt" ;;
  checks)
    echo "== correctness: backends, attention kernels, whole model bf16 vs fp32, CUDA graphs; tile sweep"
    timeout 120 python3 benchmarks/gpu_checks.py 2>&1 | tee "$out/gpu_checks.txt" || status=1 ;;
  unit)
    echo "== unit tests on CUDA (triton kernels for real, not interpreted; CUDA graphs replayed)"
    (cd tests && timeout "${UNIT_SECONDS:-180}" python3 -m pytest -q -x ${UNIT_TESTS:-test_cuda_graphs.py test_triton.py test_experts.py test_gpu_paths.py test_model.py} \
      -p no:cacheprovider) 2>&1 | tail -15 | tee "$out/gpu_pytest.txt" || status=1 ;;
  bench)
    echo "== benchmark: full size, bf16 and fp16, mixed-length workload"
    timeout 120 python3 -m nomic_moe_cli bench --device cuda --dtypes bfloat16,float16 --texts 4096 \
      --batch-size 256 --batching "${BENCH_BATCHING:-both}" --out "$out/gpu_bench.json" 2>&1 | tail -40 | tee "$out/gpu_bench.txt" || status=1 ;;
  serve-torch)
    echo "== serving: PyTorch bf16 on CUDA under closed-loop load"
    wait_prep "$work/model.done" 60 || { status=1; continue; }
    timeout 110 python3 benchmarks/serve_bench.py "$work/model" --servers "ours:bfloat16@--device=cuda" --seconds 4 --scenarios mixed,queries,documents \
      --query-clients 1,16,64 --doc-clients 1,4 --out "$out/serve_torch.json" 2>&1 | tail -30 | tee "$out/serve_torch.txt" || status=1 ;;
  onnx)
    echo "== ONNX Runtime CUDA (fp16 and the exact graph) against PyTorch CUDA"
    has_ort_cuda || { echo "onnxruntime-gpu with CUDA not importable: skipped" | tee "$out/ort_gpu.txt"; status=1; continue; }
    wait_prep "$work/onnx.done" 240 || { status=1; continue; }
    timeout 120 python3 -m nomic_moe_cli bench-onnx "$work/model" --provider cuda --files model_fp16.onnx,model.onnx \
      --torch-dtypes bfloat16,float16 --texts 2048 --batch-size 128 --out "$out/ort_gpu.json" 2>&1 | tail -30 | tee "$out/ort_gpu.txt" || status=1 ;;
  serve-onnx)
    echo "== serving: ORT CUDA fp16 under closed-loop load"
    has_ort_cuda || { status=1; continue; }
    wait_prep "$work/onnx.done" 120 || { status=1; continue; }
    timeout 120 python3 benchmarks/serve_bench.py "$work/model" --servers "ours:float32@--onnx=model_fp16.onnx@--provider=cuda" \
      --seconds 4 --scenarios mixed,queries,documents --query-clients 1,16,64 --doc-clients 1,4 --out "$out/serve_onnx.json" 2>&1 | tail -30 | tee "$out/serve_onnx.txt" || status=1 ;;
  prep-wait) wait_prep "$work/onnx.done" 600 || status=1 ;;
  *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
