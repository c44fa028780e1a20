#!/usr/bin/env bash
# Every GPU check of the routing issue in one run, for a lent GPU (the device tool), < 8 minutes:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# Needs only what the GPU image has (torch, transformers, triton, tokenizers, pytest): the package
# is put on PYTHONPATH under its installed names, nothing is pip-installed. Results land in $OUT
# (the device tool's folder) or benchmarks/out; copy the table into benchmarks/RESULTS.md with the
# card's name and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
site=$(mktemp -d)
for pkg in modeling conversion files inference cli training; do ln -s "$PWD/$pkg" "$site/nomic_moe_$pkg"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "== doctor: what auto picks on this GPU, and the kernels compiled for it"
  python3 -m nomic_moe_cli doctor --dtype bfloat16 --compile; python3 -m nomic_moe_cli doctor --dtype float16; } 2>&1 | tee "$out/gpu_env.txt"

echo "== correctness: backends, varlen attention, whole model bf16 vs fp32 (about 1 min)"
timeout 180 python3 benchmarks/gpu_checks.py 2>&1 | tee "$out/gpu_checks.txt" || status=1

echo "== unit tests on CUDA (triton kernels for real, not interpreted)"
(cd tests && timeout 180 python3 -m pytest -q -x test_triton.py test_experts.py test_model.py test_gpu_paths.py -p no:cacheprovider) 2>&1 | tail -5 | tee "$out/gpu_pytest.txt" || status=1

echo "== benchmark: full size, bf16 and fp16, mixed-length workload"
timeout 240 python3 -m nomic_moe_cli bench --device cuda --dtypes bfloat16,float16 --texts 4096 \
  --batch-size 256 --batching both --out "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.txt" || status=1
echo "== ONNX Runtime CUDA (fp16) against PyTorch CUDA, if onnxruntime-gpu was carried (../shared/device/ort-gpu-parts.sh)"
if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  work=$(mktemp -d)
  timeout 300 bash -c "python3 -m nomic_moe_cli synth $work/src --real-size \
    && python3 -m nomic_moe_cli convert $work/src $work/model \
    && python3 -m nomic_moe_cli export-onnx $work/model --exporter torch --variants model,fused,fp16 \
    && python3 -m nomic_moe_cli bench-onnx $work/model --provider cuda --files model_fp16.onnx,model.onnx \
         --torch-dtypes bfloat16,float16 --texts 2048 --batch-size 128 --out $out/ort_gpu.json" 2>&1 | tail -30 | tee "$out/ort_gpu.txt" || status=1
else
  echo "onnxruntime-gpu not present: skipped (carry it with ../shared/device/ort-gpu-parts.sh)" | tee "$out/ort_gpu.txt"
fi
exit $status
