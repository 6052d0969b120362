#!/usr/bin/env bash
# Every GPU check one device lease affords, in one call (the lease is short and a fresh machine
# costs minutes to start): the Triton and CUDA tests on the GPU beside the rest of the suite on
# other cores, then the Triton kernel and training step benchmark alone on the GPU.
# Logs, JUnit XML and the benchmark's JSON go to $OUT. Offline: the image's python3 holds torch,
# triton, pytest(-xdist, -timeout), hypothesis, transformers, scikit-learn and matplotlib.
#
#     OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
TESTS_S=${TESTS_S:-280}  # both test runs together
BENCH_S=${BENCH_S:-260}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi
    $PY -c "import os, sys, torch, triton, transformers
print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('triton', triton.__version__, '| transformers', transformers.__version__)
print('cores', len(os.sched_getaffinity(0)), '| torch threads', torch.get_num_threads())
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    gcc --version | head -n 1
    /usr/bin/time -f "import torch: %e s" $PY -c "import torch"
    # the console script and the torch.compile backend entry point need the package installed
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "pip failed"
} >"$OUT/env.txt" 2>&1
$PY -c "import sparsefx" 2>/dev/null || export PYTHONPATH=$PWD

half=$(($(nproc) / 2))
pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
pytest=($PY -m pytest -v -p no:cacheprovider --hypothesis-profile=ci -rfE --durations=30)
# SIGINT at the limit: pytest then still prints the failures, the durations and the JUnit XML
limit=(timeout -s INT -k 30)
$PY -c "import pytest_timeout" 2>/dev/null && pytest+=(--timeout=240)
# the files whose CUDA runs never finished first (xdist hands out tests in this order); the
# kernel tests, which passed on an H200, last
gpu_tests=(tests/test_triton_pipeline.py tests/test_autocast.py tests/test_accuracy_benchmark.py
    tests/test_coupling.py tests/test_triton_kernels.py)
pin "0-$((half - 1))" "${limit[@]}" "$TESTS_S" "${pytest[@]}" -n "$((half > 3 ? half - 2 : 1))" \
    --junitxml="$OUT/gpu_tests.xml" "${gpu_tests[@]}" >"$OUT/gpu_tests.log" 2>&1 &
# no chromium on the device image: the HTML report's browser test is the one left out
pin "$half-$((2 * half - 1))" "${limit[@]}" "$TESTS_S" "${pytest[@]}" -n "$half" \
    --junitxml="$OUT/other_tests.xml" "${gpu_tests[@]/#/--ignore=}" -k "not headless_chromium" \
    >"$OUT/other_tests.log" 2>&1 &
wait
"${limit[@]}" "$BENCH_S" $PY benchmarks/triton_speed.py --dtype bf16 --json "$OUT/triton_speed.json" \
    >"$OUT/triton_speed.log" 2>&1
echo "benchmark rc=$?" >>"$OUT/triton_speed.log"
tail -n 3 "$OUT"/*.log
