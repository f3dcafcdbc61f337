#!/usr/bin/env bash
# Everything that waits for a GPU, in stages that each fit one call of the device tool (10 minutes).
#
# On the dev machine, once per session (fetches the wheels the GPU image lacks, copies ../shared data,
# both into the git-ignored .gpu/ that the device call carries):
#     bash benchmarks/gpu_check.sh prep
# On a fresh GPU machine, the whole check is two calls (device tool: run with carry [".gpu"]), each under
# ten minutes by its own time limits (not yet timed on a GPU):
#     bash benchmarks/gpu_check.sh test     # correctness of every backend (the CUDA extensions' tests, cuSPARSELt and
#                                           # mma.sp, in one group): 3 pytest processes at once (<= 300 s),
#                                           # then the timing-sensitive tests alone (<= 150 s); JUnit + JSON lines
#     bash benchmarks/gpu_check.sh bench    # Triton kernels compiled in 11 processes (<= 150 s), decode (kernels,
#                                           # Llama-3-8B shapes, M 1,16,64,2048, every backend incl. the mma.sp kernel
#                                           # `mmasp` at M <= 16; <= 240 s), prefill at M 2048 (<= 150 s)
# The other stages, for longer sessions:
#     bash benchmarks/gpu_check.sh decode   # benchmarks.kernels, Llama-3-8B shapes (DTYPES=fp16; bf16: a 2nd call)
#     bash benchmarks/gpu_check.sh prefill  # benchmarks.prefill: dense vs torch vs cusparselt vs dispatch
#     bash benchmarks/gpu_check.sh prune    # prune_speed on a Llama-3-8B-shaped model (PRUNE_LAYERS layers)
#     bash benchmarks/gpu_check.sh rotation # benchmarks.rotation_overhead: layer time with/without the residual rotation
#     bash benchmarks/gpu_check.sh engine   # benchmarks.engine: Llama-3-8B shapes, random fp16 weights, dense vs 2:4,
#                                           # CUDA-graph decode at batch 1 and 8, peak device memory
# Logs and result files land in $OUT (the device tool brings them back); commit them under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_check.sh prep|test|bench|decode|prefill|prune|rotation|engine}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-8}  # the GPU machines have 16 cores

if [[ $stage == prep ]]; then
    shared=${SPARSE_RUNTIME_SHARED:-../shared}
    rm -rf .gpu && mkdir -p .gpu/shared/data/text .gpu/shared/data/models .gpu/whl
    cp -r "$shared/data/models/stories260K" .gpu/shared/data/models/
    cp "$shared"/data/text/*.{txt,jsonl} .gpu/shared/data/text/
    # The GPU image (Python 3.12) lacks gguf; nothing can be downloaded there.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .gpu/whl gguf
    du -sh .gpu
    exit 0
fi

# --- on the GPU machine ---
[[ -d .gpu ]] || { echo "run 'gpu_check.sh prep' here first and carry .gpu" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export SPARSE_RUNTIME_SHARED=$PWD/.gpu/shared
SPARSE_RUNTIME_REQUIRE_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5
python3 -m sparse_runtime info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$OUT/info.txt" || true

case $stage in
test)
    # Correctness of every backend against float64 references. Triton is pinned to one config per schedule,
    # so a cold cache compiles a handful of kernels (tests/test_kernels_sparse24.py covers the others AOT), and
    # three pytest processes run at once, so those compilations and the extension's builds use several cores;
    # the timing-sensitive tests (timers, dispatch decisions) run alone afterwards. timeout sends SIGINT (KILL
    # 20 s later): pytest stops as on Ctrl-C and still writes its summary and JUnit XML; every finished test is
    # also in test_gpu.jsonl at once (tests/pytest_jsonl.py). No -x: one call reports every failure.
    export SPARSE_RUNTIME_TRITON_CONFIGS=pinned SPARSE_RUNTIME_TEST_LOG="$OUT/test_gpu.jsonl"
    serial="tests/test_timing.py tests/test_dispatch.py tests/test_bench_kernels.py"
    group() {  # name, time limit (s), pytest arguments
        local name=$1 limit=$2; shift 2
        timeout -s INT -k 20 "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
            --junitxml="$OUT/test_gpu_$name.xml" "$@" > "$OUT/test_gpu_$name.log" 2>&1 || true
        tail -3 "$OUT/test_gpu_$name.log"
    }
    group triton "${PARALLEL_S:-300}" tests/test_kernels_sparse24.py tests/test_triton_ops.py tests/test_backend_triton.py &
    cuda_ext="tests/test_cusparselt.py tests/test_backend_torch_semi.py tests/test_mmasp.py tests/test_backend_mmasp.py"
    group cuda_ext "${PARALLEL_S:-300}" $cuda_ext &
    group rest "${PARALLEL_S:-300}" tests $(for f in $serial tests/test_kernels_sparse24.py tests/test_triton_ops.py \
        tests/test_backend_triton.py $cuda_ext; do echo --ignore=$f; done) &
    wait
    group serial "${SERIAL_S:-150}" $serial
    ;;
bench)
    # The benchmarks of the ten-minute check in one call: the decode benchmark's Triton kernels compiled in
    # parallel processes first (benchmarks.precompile: its autotuner then hits the on-disk cache), decode on
    # the Llama-3-8B shapes at a few M, then prefill at M = 2048; each step under its own time limit.
    timeout -s INT -k 20 "${PRECOMPILE_S:-150}" python3 -m benchmarks.precompile --shards 11 --ms "${MS:-1,16,64,2048}" \
        --shapes "${SHAPES:-4096x4096,1024x4096,14336x4096,4096x14336}" 2>&1 | tail -20 | tee "$OUT/precompile.log" || true
    timeout -s INT -k 20 "${DECODE_S:-240}" python3 -m benchmarks.kernels --dtypes fp16 --ms "${MS:-1,16,64,2048}" \
        --shapes "${SHAPES:-4096x4096,1024x4096,14336x4096,4096x14336}" --out "$OUT" 2>&1 | tee "$OUT/decode.log" || true
    timeout -s INT -k 20 "${PREFILL_S:-150}" python3 -m benchmarks.prefill --dtype float16 --m 2048 --out "$OUT" 2>&1 \
        | tee "$OUT/prefill.log" || true
    ;;
decode)
    # The full sweep may not fit one call: split it with SHAPES (e.g. 4096x4096,1024x4096 then the other two).
    timeout -s INT -k 20 560 python3 -m benchmarks.kernels --dtypes "${DTYPES:-fp16}" --ms "${MS:-1,2,4,8,16,32,64,128,512,2048,8192}" \
        --shapes "${SHAPES:-4096x4096,1024x4096,14336x4096,4096x14336}" --out "$OUT" 2>&1 | tee "$OUT/decode.log" || true
    ;;
prefill)
    for dt in float16 bfloat16; do
        timeout -s INT -k 20 280 python3 -m benchmarks.prefill --dtype $dt --m 512 2048 8192 --out "$OUT" 2>&1 | tee -a "$OUT/prefill.log" || true
    done
    ;;
prune)
    # The full 32 layers take longer than one call; time PRUNE_LAYERS layers and scale (stated in the JSON).
    timeout 560 python3 -m benchmarks.prune_speed --llama3-8b-shape --layers "${PRUNE_LAYERS:-4}" --nsamples 128 --seqlen 2048 \
        --methods ${METHODS:-wanda sparsegpt} --out "$OUT/prune_speed_llama3_8b.json" 2>&1 | tee "$OUT/prune.log"
    ;;
rotation)
    # One Llama-3-8B-shaped layer, 2:4 on backend auto, with and without its boundary rotation (M = 1..16, 2048).
    SPARSE_RUNTIME_TRITON_CONFIGS=pinned timeout -s INT -k 20 280 python3 -m benchmarks.rotation_overhead \
        --out "$OUT/rotation_overhead.json" 2>&1 | tee "$OUT/rotation.log" || true
    ;;
engine)
    # Issue 11's GPU targets: 2:4 decode at batch 1 >= 1.5x dense tokens/s, peak memory below dense.
    timeout -s INT -k 20 "${ENGINE_S:-520}" python3 -m benchmarks.engine --config llama3-8b --device cuda \
        --batches 1 8 --tokens 33 --repeats 3 --prompt-tokens 512 --prefill-batch 4 \
        --out "$OUT/engine_llama3_8b.json" 2>&1 | tee "$OUT/engine.log" || true
    ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
