#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: every CUDA test (the Triton step's compiled, not
# interpreted), then the optimizer-step (a 100.7M-parameter
# Linear stack and the built-in GPT), capture-overhead, Hessian and measured-peak checks on CUDA, each under
# its own time limit and all within one budget, 9 minutes by default (GPU_CHECK_SECONDS): a part
# gets its own limit or what is left of the budget, whichever is less, and a part that finds the
# budget spent is skipped (status.txt says so), so the call ends in time and says what it cut.
# Results as text and JSON in OUT:
#
#     bash benchmarks/gpu_check.sh [OUT]          # default OUT: gpu-check
#
# OUT/device.txt (GPU, driver, torch), OUT/tests.txt (pytest of the CUDA tests),
# OUT/optimizer_step_linear100m.{json,txt}, OUT/optimizer_step_gpt.json, OUT/capture_overhead.json,
# OUT/capture_overhead_124m.json (gpt2-124m: one measurement against a step, and on a side stream),
# OUT/hessian.json, OUT/memory_measure.json (the traced peak of each optimizer beside two real
# steps' max_memory_allocated and _reserved), OUT/status.txt (each part's exit status; 124: it ran out of time). A part that
# fails does not stop the others. Uses the python on PATH; if it cannot import lowmem, the checkout
# is put on PYTHONPATH (torch with CUDA must be installed already).
set -uo pipefail
OUT=${1:-gpu-check}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
python -c "import lowmem" 2>/dev/null || export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/status.txt"

BUDGET=${GPU_CHECK_SECONDS:-540}
part() {   # part NAME SECONDS COMMAND...: run with a limit (at most what is left of BUDGET), record the exit status
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "$name skipped: the ${BUDGET}-second budget is spent" >> "$OUT/status.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "$name rc=$? seconds=$((SECONDS - t0)) limit=$limit" >> "$OUT/status.txt"
}

part device 60 bash -c "nvidia-smi > '$OUT/device.txt' 2>&1; python -c 'import torch, platform; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), platform.python_version())' >> '$OUT/device.txt' 2>&1"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing else to run" | tee -a "$OUT/status.txt"
    exit 1
fi
# one process (-o addopts= drops pyproject's `-n auto`, so pytest-xdist need not be installed); the
# measurements' Triton kernels compile on first use here (a few seconds each)
part tests 180 python -m pytest -o addopts= -q -p no:cacheprovider -p no:warnings \
    tests/compress/optim/test_cuda.py tests/compress/optim/test_triton.py tests/snr/test_capture_cuda.py \
    tests/snr/test_triton_measurements.py \
    "tests/hessian/test_structure.py::test_structure_of_a_cuda_block_matches_the_cpu" \
    "tests/cli/test_memory_cli.py::test_measured_on_cuda_beside_the_trace" > "$OUT/tests.txt" 2>&1
part step_linear100m 120 python benchmarks/optimizer_step.py --device cuda --model linear --layers 6 --width 4096 \
    --rounds 5 --steps 5 --warmup 2 --no-compiled --refresh-reps 1 --json > "$OUT/optimizer_step_linear100m.json" 2> "$OUT/optimizer_step_linear100m.txt"
part step_gpt 60 python benchmarks/optimizer_step.py --device cuda --model gpt --rounds 8 --steps 5 --no-compiled \
    --refresh-reps 1 --json > "$OUT/optimizer_step_gpt.json" 2> "$OUT/optimizer_step_gpt.err"
part capture 60 python benchmarks/capture_overhead.py --device cuda --rounds 10 --json > "$OUT/capture_overhead.json" 2> "$OUT/capture_overhead.err"
part hessian 120 python benchmarks/hessian.py --device cuda --sizes 1024 --repeats 1 --json > "$OUT/hessian.json" 2> "$OUT/hessian.err"
part memory_measure 60 python -m lowmem.cli.main memory --example shakespeare --batch 64 --measure --device cuda \
    --format json > "$OUT/memory_measure.json" 2> "$OUT/memory_measure.err"
# last: were the parts before it to run to their limits, this is the one the budget cuts
part capture_124m 90 python benchmarks/capture_overhead.py --device cuda --model gpt2-124m --batch 8 --seq 512 --direct 5 \
    --json > "$OUT/capture_overhead_124m.json" 2> "$OUT/capture_overhead_124m.err"
cat "$OUT/status.txt"
