#!/usr/bin/env bash
# The GPU check in one command, sized for one call of a lent GPU machine (no network, one command of at most ten
# minutes, at most 8 files back). docs/gpu_check.md says what each step does and what comes back.
#
# Here, on the machine you develop on (needs PyPI), whenever the code or the wheel list changes:
#     bash benchmarks/gpu_check.sh prep        # the wheels the GPU image lacks + the test data -> .gpu/ (git-ignored)
# There (device tool: run with carry [".gpu"] and timeout_s 600):
#     bash benchmarks/gpu_check.sh             # every step, in order, each under its time limit (sum <= 480 s)
#     bash benchmarks/gpu_check.sh decode ...  # setup, then only the steps named (also: rotation, prune, which the
#                                              # default leaves out: each fills a call of its own)
# Anywhere (CI: tests/test_gpu_check.py), no GPU needed:
#     bash benchmarks/gpu_check.sh --dry-run   # the same control flow, every step's command replaced by a stub that
#                                              # writes what the step writes; then the checks below
#     bash benchmarks/gpu_check.sh wheels      # the carried wheels, NAME==VERSION a line
#     bash benchmarks/gpu_check.sh check-wheels [NAME==VERSION ...]  # they cover every third-party import
#
# No `set -e`: a failed step (a build, a test, a benchmark) is reported and the next one runs. Every step runs in a
# process of its own under `timeout` (SIGINT at its limit less GRACE s, so pytest still writes its JUnit XML; SIGKILL
# at the limit), and after every step what it left is gathered into $OUT, so a step cut off keeps everything before.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/benchmarks/gpu_check.sh

# name:limit (seconds). The limits add up to at most BUDGET_S (checked before anything runs): with the machine's start
# and the transfers, the call fits the 15 minutes of device time a task gets. GPU_CHECK_STEPS overrides them.
STEPS=${GPU_CHECK_STEPS:-"setup:60 tests:170 decode:100 prefill:40 engine:110"}
MORE_STEPS="rotation:280 prune:420"  # run only when named
BUDGET_S=480
GRACE=${GPU_CHECK_GRACE:-10}
MAX_OUT_FILES=8  # what the device tool brings back from $OUT, at most 2 folders down

# The GPU image (Python 3.12; KINDS.md of the device tool lists its packages) lacks the server's packages (starlette,
# uvicorn; the tests' openai client) and gguf. Carried as wheels, pinned, with every requirement of theirs the image
# does not have in a version they accept (check-wheels walks them); the versions the CPU suite runs.
WHEELS="openai==3.63.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 jiter==0.19.0 pydantic==2.14.4
pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 sniffio==1.3.1
anyio==4.16.0 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 starlette==1.10.0 uvicorn==0.55.0 click==8.5.1 gguf==0.19.0"
# What the image has that the project imports (or the carried wheels require): not carried.
IMAGE_HAS="torch triton transformers tokenizers safetensors sentencepiece numpy matplotlib psutil pytest tqdm pyyaml
requests idna certifi"
# Imported only where present: compressed-tensors 0.14 lives in .venv/ct014 (tests/ct_helpers.py skips without it).
OPTIONAL="compressed_tensors"
# Imported at collection by tests/test_server.py: without them that file is left out (and the reason printed).
SERVER_IMPORTS="openai uvicorn httpx starlette"

GPU_DIR=${GPU_CHECK_DIR:-$ROOT/.gpu}
OUT=${OUT:-/tmp/gpu_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
SITE=$WORK/site
if [[ -z ${PYTHON:-} ]]; then  # the GPU image's python3 holds torch; here the project's venv has the packages
    PYTHON=python3
    [[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python
fi
DECODE_SHAPES=4096x4096,14336x4096,4096x14336,1024x4096
DECODE_PROVIDERS=dense,triton,mmasp,cusparselt,dispatch  # dense: cuBLAS

dry() { [[ ${GPU_CHECK_DRY:-0} == 1 ]]; }

# -- checks ------------------------------------------------------------------------------------------------------
check_limits() {  # STEP:LIMIT ...: the steps that will run
    local sum=0 step
    for step in "$@"; do sum=$((sum + ${step#*:})); done
    if ((sum > BUDGET_S)); then
        echo "gpu_check: the step limits add up to ${sum} s, over the budget of ${BUDGET_S} s ($*)" >&2
        return 1
    fi
    echo "step limits: $*; sum ${sum} s <= ${BUDGET_S} s"
}

check_out() {  # what the device tool brings back: <= 8 files, <= 2 folders down, plain names
    local files deep odd
    files=$(find "$OUT" -type f | wc -l)
    deep=$(find "$OUT" -mindepth 4 -type f | wc -l)
    odd=$(find "$OUT" -mindepth 1 | sed "s|^$OUT/||" | grep -c '[^A-Za-z0-9._/-]')
    if ((files > MAX_OUT_FILES || deep > 0 || odd > 0)); then
        echo "gpu_check: \$OUT holds $files files (at most $MAX_OUT_FILES), $deep more than 2 folders down," \
            "$odd with names the device tool does not bring back" >&2
        return 1
    fi
    echo "\$OUT: $files files (at most $MAX_OUT_FILES), none deeper than 2 folders"
}

check_wheels() {  # NAME==VERSION ...: every third-party import of the project and its tests is carried or there
    "$PYTHON" - "$ROOT" "$IMAGE_HAS" "$OPTIONAL" "$@" <<'EOF'
import ast, importlib.metadata as md, pathlib, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

root, image, optional, wheels = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4:]
carried = {canon(w.split("==")[0]): w for w in wheels}
problems = [f"{w}: not pinned (NAME==VERSION)" for w in wheels if "==" not in w]
problems += [f"{n}: more than one version (pip installs none)" for n in carried
             if sum(canon(w.split("==")[0]) == n for w in wheels) > 1]
there = {canon(n) for n in image}
# the GPU image: CPython 3.12 on x86-64 Linux; extras are not installed
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
files = [*root.glob("tests/*.py"), *root.glob("benchmarks/*.py"), *root.glob("sparse_runtime/**/*.py")]
local = {"sparse_runtime", "benchmarks", "kernels", "build_config"} | {p.stem for p in root.glob("tests/*.py")}
imported = set()
for f in files:
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
dists = md.packages_distributions()
todo = []
for mod in sorted(imported - set(sys.stdlib_module_names) - local - set(optional)):
    if mod not in dists:
        problems.append(f"import {mod}: not installed here, so its distribution and requirements are unknown")
    todo += [(canon(d), f"import {mod}") for d in dists.get(mod, ())]
seen = set()
while todo:
    name, why = todo.pop()
    if name in seen or name in there:
        continue
    seen.add(name)
    if name not in carried:
        problems.append(f"{name} ({why}): neither carried nor in the GPU image")
        continue
    try:
        requires = md.distribution(name).requires or []
    except md.PackageNotFoundError:
        problems.append(f"{name}: not installed here, so its requirements are unknown")
        continue
    for r in map(Requirement, requires):
        if r.marker is None or r.marker.evaluate(env):
            todo.append((canon(r.name), f"required by {name}"))
            pin = carried.get(canon(r.name), "==").split("==")[1]
            if pin and not r.specifier.contains(pin, prereleases=True):
                problems.append(f"{carried[canon(r.name)]}: {name} requires {r}")
problems += [f"{w}: carried but nothing needs it" for n, w in carried.items() if n not in seen]
for p in problems:
    print("gpu_check: wheels:", p, file=sys.stderr)
if problems:
    sys.exit(1)
print(f"carried wheels: {len(carried)}, covering every third-party import of tests/, benchmarks/ and sparse_runtime/")
EOF
}

wheel_file() {  # the wheel of NAME==VERSION in $GPU_DIR/whl, by the wheel file-name rule (- . -> _)
    compgen -G "$GPU_DIR/whl/$(tr '.-' '__' <<<"${1%%==*}")-${1#*==}-*.whl"
}

check_carry() {  # the stub or real .gpu/ holds a wheel per pinned name and the test data
    local w missing=0
    for w in $WHEELS; do
        wheel_file "$w" >/dev/null || { echo "gpu_check: $GPU_DIR/whl has no wheel of $w (run prep)" >&2; missing=1; }
    done
    [[ -d $GPU_DIR/shared/data/models/stories260K ]] || { echo "gpu_check: no test data in $GPU_DIR/shared" >&2; missing=1; }
    return $missing
}

# -- prep (here) --------------------------------------------------------------------------------------------------
prep() {
    local shared=${SPARSE_RUNTIME_SHARED:-$ROOT/../shared}
    check_wheels $WHEELS || return 1
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/shared/data/text" "$GPU_DIR/shared/data/models" "$GPU_DIR/whl" || return 1
    cp -rL --no-preserve=mode "$shared/data/models/stories260K" "$GPU_DIR/shared/data/models/" || return 1
    cp -L --no-preserve=mode "$shared"/data/text/*.{txt,jsonl} "$GPU_DIR/shared/data/text/" || return 1
    # shellcheck disable=SC2086  # one argument per pin
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$GPU_DIR/whl" $WHEELS || return 1
    { git rev-parse HEAD 2>/dev/null; git status --porcelain 2>/dev/null | wc -l | sed 's/$/ files differ from that commit/'; } \
        > "$GPU_DIR/prep.txt"
    check_carry || return 1
    du -sh "$GPU_DIR" "$GPU_DIR/whl"
}

# -- the steps (each runs in a process of its own: `gpu_check.sh _step NAME`) ---------------------------------------
remaining() { echo $(( ${STEP_END:-$((SECONDS + 600))} - $(date +%s) )); }

within() {  # COMMAND...: under the step's remaining time (SIGINT first, so pytest writes its report)
    local left
    left=$(remaining)
    timeout -s INT -k "$GRACE" "$((left > GRACE ? left - GRACE : 1))" "$@"
}

step_setup() {
    if compgen -G "$GPU_DIR/whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$GPU_DIR"/whl/*.whl || echo "gpu_check: installing the carried wheels failed"
    else
        echo "gpu_check: no wheels in $GPU_DIR/whl (run prep here and carry .gpu): the server tests are left out"
    fi
    [[ -f $GPU_DIR/prep.txt ]] && echo "prep: $(tr '\n' ' ' <"$GPU_DIR/prep.txt")"
    nvcc --version | tail -2
    # The project against the torch already here; both extensions built (a failed one is reported by setup.py and
    # by `info` below; the Triton backends run without them).
    MAX_JOBS=${MAX_JOBS:-16} within "$PYTHON" -m pip install --no-deps --no-build-isolation -e . \
        || MAX_JOBS=${MAX_JOBS:-16} within "$PYTHON" setup.py build_ext --inplace
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    "$PYTHON" -m sparse_runtime info
    # the step's result: both extensions load (else it names the one that does not, and the steps after run on)
    "$PYTHON" -c "
import importlib, sys
missing = []
for ext in ('sparse_runtime._C', 'sparse_runtime._mmasp'):
    try:
        importlib.import_module(ext)
    except ImportError as e:
        missing.append(f'{ext}: {e}')
print(*(missing or ['both extensions load']), sep='\n')
sys.exit(1 if missing else 0)"
}

step_tests() {
    # Correctness of every GPU backend, and of the GPU paths of the engine, checkpoints and rotation, against float64
    # references; Triton pinned to one config per schedule, so a cold cache compiles a handful of kernels. The
    # timing-sensitive tests (timers, dispatch decisions) run alone afterwards, in the step's last SERIAL_S (40) s.
    export SPARSE_RUNTIME_TRITON_CONFIGS=pinned SPARSE_RUNTIME_TEST_LOG=$WORK/logs/test_gpu.jsonl
    local serial=(tests/test_timing.py tests/test_dispatch.py tests/test_bench_kernels.py) leave=() parallel=() mod
    for mod in $SERVER_IMPORTS; do
        if ! "$PYTHON" -c "import $mod" 2>/dev/null; then
            echo "gpu_check: leaving out tests/test_server.py: cannot import $mod (carry its wheels: prep)"
            leave=(--ignore=tests/test_server.py)
            break
        fi
    done
    "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")  # compiles on several cores
    local serial_s=${SERIAL_S:-40} rc
    STEP_END=$(($(date +%s) + $(remaining) - serial_s)) within "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rfEs \
        "${parallel[@]}" --junitxml="$WORK/logs/junit_gpu.xml" tests "${leave[@]}" "${serial[@]/#/--ignore=}"
    rc=$?
    within "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rfEs --junitxml="$WORK/logs/junit_gpu_serial.xml" \
        "${serial[@]}" || rc=$?
    return $rc
}

step_decode() {
    # Decode GEMMs of the Llama-3-8B linears (benchmarks.kernels: CUDA graphs of passes over copies > 3x L2), the
    # providers that are available here (a provider whose extension did not build is left out, and said so).
    local providers
    providers=$("$PYTHON" - "$DECODE_PROVIDERS" <<'EOF'
import sys
from sparse_runtime import backends
why = backends.availability("cuda")
wanted = sys.argv[1].split(",")
for p in wanted:
    if p != "dense" and why.get(p, "not a backend"):
        print(f"gpu_check: decode without {p}: {why.get(p, 'not a backend')}", file=sys.stderr)
print(",".join(p for p in wanted if p == "dense" or why.get(p, "not a backend") is None))
EOF
)
    SPARSE_RUNTIME_TRITON_CONFIGS=pinned within "$PYTHON" -m benchmarks.kernels --dtypes fp16 --ms 1,4,16 \
        --shapes "$DECODE_SHAPES" --providers "${providers:-dense}" --out "$WORK/results"
}

step_prefill() {
    SPARSE_RUNTIME_TRITON_CONFIGS=pinned within "$PYTHON" -m benchmarks.prefill --dtype float16 --m 2048 \
        --shapes 4096x4096,14336x4096 --out "$WORK/results"
}

step_engine() {
    # Llama-3-8B shapes, random fp16 weights: batch-1 decode of the engine (CUDA graphs), dense then 2:4. Each variant
    # prints its JSON when done, so a cut-off run keeps the dense one in engine.log.
    within "$PYTHON" -m benchmarks.engine --config llama3-8b --device cuda --batches 1 --tokens 17 --repeats 2 \
        --prompt-tokens 128 --prefill-batch 1 --out "$WORK/results/engine_llama3_8b.json"
}

step_rotation() {  # one Llama-3-8B-shaped layer, 2:4 on backend auto, with and without its boundary rotation
    SPARSE_RUNTIME_TRITON_CONFIGS=pinned within "$PYTHON" -m benchmarks.rotation_overhead \
        --out "$WORK/results/rotation_overhead.json"
}

step_prune() {  # prune_speed on a Llama-3-8B-shaped model: PRUNE_LAYERS of its 32 layers, scaled (said in the JSON)
    within "$PYTHON" -m benchmarks.prune_speed --llama3-8b-shape --layers "${PRUNE_LAYERS:-4}" --nsamples 128 \
        --seqlen 2048 --methods ${METHODS:-wanda sparsegpt} --out "$WORK/results/prune_speed_llama3_8b.json"
}

dry_step() {  # the stub of step $1: what the step writes, without a GPU (GPU_CHECK_DRY_FAIL/_HANG: a step that
    # fails or outlives its limit, to check that the next steps still run)
    local name=$1
    echo "dry run: $name"
    [[ ${GPU_CHECK_DRY_HANG:-} == "$name" ]] && sleep 3600
    [[ ${GPU_CHECK_DRY_FAIL:-} == "$name" ]] && { echo "dry run: $name fails"; return 3; }
    case $name in
    setup) check_carry && mkdir -p "$SITE" ;;
    tests)
        echo '{"test": "tests/test_dry.py::test_stub", "outcome": "passed", "phase": "call"}' >"$WORK/logs/test_gpu.jsonl"
        for f in junit_gpu junit_gpu_serial; do
            echo '<testsuites><testsuite name="pytest" tests="1" failures="0" errors="0" skipped="0">'`
                `'<testcase classname="tests.test_dry" name="test_stub"/></testsuite></testsuites>' >"$WORK/logs/$f.xml"
        done ;;
    decode) echo '{"rows": []}' >"$WORK/results/kernels-DRY_RUN-20260101T000000.json"
        touch "$WORK/results/kernels-DRY_RUN-20260101T000000.png" ;;
    prefill) echo '{"rows": []}' >"$WORK/results/prefill-DRY_RUN-20260101T000000.json"
        touch "$WORK/results/prefill-DRY_RUN-20260101T000000.png" ;;
    engine) echo '{"variants": {}}' >"$WORK/results/engine_llama3_8b.json"
        touch "$WORK/results/engine_llama3_8b.png" ;;
    rotation | prune) echo '{}' >"$WORK/results/$name.json" ;;
    esac
}

# -- the driver ---------------------------------------------------------------------------------------------------
collect() {  # $OUT: the summary, the result JSONs as they are, everything else in one tar.gz
    local f tmp
    for f in "$WORK"/results/*.json; do
        [[ -f $f ]] && cp "$f" "$OUT/$(basename "$f" | tr -c 'A-Za-z0-9._\n-' '_')"
    done
    tmp=$(mktemp "$WORK/logs.XXXX")
    tar czf "$tmp" -C "$WORK" logs $(cd "$WORK" && compgen -G "results/*.png") 2>/dev/null
    mv "$tmp" "$OUT/logs.tar.gz"
    summary >"$WORK/summary.tmp"  # (its exit status is its last test's, not a failure)
    mv "$WORK/summary.tmp" "$OUT/gpu_check.txt"
}

summary() {
    echo "GPU check$(dry && echo ' (dry run)'), $(date -u +%FT%TZ); prep: $(cat "$GPU_DIR/prep.txt" 2>/dev/null | tr '\n' ' ')"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
    printf '%-8s %6s %8s  %s\n' step limit seconds result
    cat "$WORK/steps.txt"
    "$PYTHON" - "$WORK/logs" <<'EOF'
import glob, sys
import xml.etree.ElementTree as ET
for path in sorted(glob.glob(f"{sys.argv[1]}/junit_*.xml")):
    try:
        cases = ET.parse(path).getroot().iter("testcase")
    except ET.ParseError:
        print(f"{path.rsplit('/', 1)[-1]}: unreadable (cut off while written)")
        continue
    counts, bad = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}, []
    for case in cases:
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts[{"failure": "failed"}.get(kind, kind)] += 1
        if kind in ("failure", "error"):
            bad.append(f"  {kind}: {case.get('classname')}::{case.get('name')}")
    print(f"{path.rsplit('/', 1)[-1]}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), *bad[:40], sep="\n")
EOF
    for f in "$WORK"/logs/{setup,decode,prefill,engine}.log; do
        [[ -f $f ]] && { echo "== $(basename "$f") (end)"; tail -n 25 "$f"; }
    done
}

run_step() {  # NAME LIMIT
    local name=$1 limit=$2 start=$SECONDS rc result
    echo "== $name (limit ${limit} s)"
    STEP_END=$(($(date +%s) + limit)) timeout -s INT -k "$GRACE" "$((limit - GRACE))" \
        bash "$SELF" _step "$name" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in
    0) result=ok ;;
    124 | 130 | 137) result="stopped at its time limit (rc $rc)" ;;
    *) result="failed (rc $rc)" ;;
    esac
    printf '%-8s %6d %8d  %s\n' "$name" "$limit" "$((SECONDS - start))" "$result" | tee -a "$WORK/steps.txt"
    collect
    return $((rc != 0))
}

main() {  # [STEP ...]: every step of STEPS, or setup and the steps named
    local run=() failed=0 step name
    for step in $STEPS $MORE_STEPS; do
        name=${step%%:*}
        if (($#)); then
            [[ $name == setup || " $* " == *" $name "* ]] || continue
        else
            [[ " $MORE_STEPS " != *" $step "* ]] || continue
        fi
        run+=("$step")
    done
    check_limits "${run[@]}" || return 2
    if ! dry && [[ ! -d $GPU_DIR ]]; then
        echo "gpu_check: no $GPU_DIR: run 'bash benchmarks/gpu_check.sh prep' here first and carry .gpu" >&2
    fi
    rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/results" "$OUT" && : >"$WORK/steps.txt"
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} SPARSE_RUNTIME_SHARED=$GPU_DIR/shared PYTHONUNBUFFERED=1
    export GPU_CHECK_DRY=${GPU_CHECK_DRY:-0} PYTHON GPU_DIR WORK SITE
    for step in "${run[@]}"; do
        run_step "${step%%:*}" "${step#*:}" || failed=1
    done
    check_out || failed=1
    if dry; then
        check_wheels $WHEELS || failed=1
    fi
    echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    return $failed
}

case ${1:-all} in
prep) prep ;;
wheels) tr ' ' '\n' <<<"$WHEELS" | grep . ;;
check-wheels) shift; if (($#)); then check_wheels "$@"; else check_wheels $WHEELS; fi ;;
--dry-run) shift; GPU_CHECK_DRY=1 main "$@" ;;
_step) if dry; then dry_step "$2"; else "step_$2"; fi ;;
all) main ;;
setup | tests | decode | prefill | engine | rotation | prune) main "$@" ;;
*) echo "usage: gpu_check.sh [prep | --dry-run | wheels | check-wheels [NAME==VERSION ...] | STEP ...]" \
       "(steps: $STEPS)" >&2; exit 2 ;;
esac
