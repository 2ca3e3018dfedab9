#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU (issue 5):
#   1. the GPU tests (tests/gpu_ops.rs: every op, the U-Net forward/backward, Adam/clip/EMA, ODE
#      solves, ORW steps, all against the CPU, on poisoned buffers), once with cuDNN convolutions
#      and once with the im2col+cuBLAS ones;
#   2. a short `train --device cuda` and the same run on the CPU, timed;
#   3. `bench unet --unet-config cifar10` on the GPU (TF32 off; then TF32 on, and the GEMM
#      convolutions) and on the CPU;
# and writes everything to bench/results/<date>-<device>.json (or $OUT/ when $OUT is set, as on
# the device machine), with the device, driver, commit and command.
#
# Usage:
#   scripts/gpu-check.sh            build with cargo (if there is one) and run
#   scripts/gpu-check.sh --prepare  on a build machine: build, and put stripped binaries and the
#                                   commit into .gpu-bin/ for a GPU machine that has no Rust
#                                   (carry .gpu-bin there; it is git-ignored)
# Libraries: ORWCFM_CUDA_LIB_DIRS, else the `nvidia` Python packages of python3 (cuBLAS, cuDNN,
# NVRTC wheels), else the system's.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--prepare" ]; then
    set -e
    cargo build --release --bin orwcfm-fast
    tb=$(cargo test --release --test gpu_ops --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu_ops" and m.get("executable"):
        print(m["executable"])' | tail -1)
    mkdir -p .gpu-bin
    cp target/release/orwcfm-fast .gpu-bin/orwcfm-fast
    cp "$tb" .gpu-bin/gpu_ops
    strip .gpu-bin/orwcfm-fast .gpu-bin/gpu_ops
    git rev-parse HEAD > .gpu-bin/COMMIT
    git status --porcelain | grep -q . && echo "+uncommitted changes" >> .gpu-bin/COMMIT || true
    ls -la .gpu-bin
    exit 0
fi

if [ -z "${ORWCFM_CUDA_LIB_DIRS:-}" ]; then
    d=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null) && export ORWCFM_CUDA_LIB_DIRS="$d"
fi
RES=${OUT:-$ROOT/bench/results}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$RES"
LOG="$WORK/gpu-check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

if command -v cargo >/dev/null 2>&1; then
    say "== build (cargo)"
    cargo build --release --bin orwcfm-fast 2>&1 | tail -3 | tee -a "$LOG"
    BIN=$ROOT/target/release/orwcfm-fast
    TESTBIN=$(cargo test --release --test gpu_ops --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu_ops" and m.get("executable"):
        print(m["executable"])' | tail -1)
    COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
else
    say "== no cargo here: using .gpu-bin/ (made by scripts/gpu-check.sh --prepare)"
    BIN=$ROOT/.gpu-bin/orwcfm-fast
    TESTBIN=$ROOT/.gpu-bin/gpu_ops
    COMMIT=$(cat .gpu-bin/COMMIT 2>/dev/null | tr '\n' ' ' || echo unknown)
fi
[ -x "$BIN" ] && [ -x "$TESTBIN" ] || { say "missing binaries ($BIN, $TESTBIN)"; exit 1; }

export ORWCFM_KERNEL_CACHE=${ORWCFM_KERNEL_CACHE:-/tmp/orwcfm-kernels}
say "== devices"
"$BIN" devices 2>&1 | tee -a "$LOG"
"$BIN" devices --json > "$WORK/devices.json" 2>>"$LOG"

run_tests() { # $1 = label; the rest: environment assignments
    local label=$1; shift
    say "== GPU tests ($label)"
    local t0=$(date +%s.%N)
    env ORWCFM_REQUIRE_GPU=1 "$@" "$TESTBIN" --test-threads=1 --nocapture > "$WORK/tests-$label.txt" 2>&1
    local rc=$?
    local t1=$(date +%s.%N)
    tail -40 "$WORK/tests-$label.txt" | tee -a "$LOG"
    echo "$label $rc $(awk "BEGIN{print $t1 - $t0}")" >> "$WORK/.tests"
}
run_tests cudnn
run_tests gemm ORWCFM_CONV=gemm

timed() { # $1 = label; the rest: the command; records wall seconds and the exit status
    local label=$1; shift
    say "== $label: $*"
    local t0=$(date +%s.%N)
    "$@" > "$WORK/$label.txt" 2>&1
    local rc=$?
    local t1=$(date +%s.%N)
    tail -6 "$WORK/$label.txt" | tee -a "$LOG"
    echo "$label $rc $(awk "BEGIN{print $t1 - $t0}")" >> "$WORK/.timings"
}
TRAIN=(train --num-epochs 1 --steps-per-epoch 4 --eval-samples 32 --grid-samples 16 --savedir /tmp/gpu-check-runs --overwrite --quiet)
timed train_cuda "$BIN" "${TRAIN[@]}" --run-name cuda --device cuda
timed train_cpu "$BIN" "${TRAIN[@]}" --run-name cpu --device cpu
timed bench_cuda "$BIN" bench unet --unet-config cifar10 --batch 128 --device cuda --iters 10 --warmup 3 --json
timed bench_cuda_tf32 env ORWCFM_ALLOW_TF32=1 "$BIN" bench unet --unet-config cifar10 --batch 128 --device cuda --iters 10 --warmup 3 --json
timed bench_cuda_gemmconv env ORWCFM_CONV=gemm "$BIN" bench unet --unet-config cifar10 --batch 128 --device cuda --iters 10 --warmup 3 --json
timed bench_cpu "$BIN" bench unet --unet-config cifar10 --batch "${CPU_BENCH_BATCH:-128}" --device cpu --iters 2 --warmup 1 --json

DEVNAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
python3 - "$WORK" "$RES" "$COMMIT" "$DEVNAME" "$DRIVER" <<'EOF' | tee -a "$LOG"
import json, os, re, sys, datetime
work, out_dir, commit, dev, driver = sys.argv[1:6]
res = work
def rows(name):
    p = os.path.join(res, name)
    return [l.split() for l in open(p)] if os.path.exists(p) else []
def last_json(label):
    try:
        lines = [l for l in open(os.path.join(res, label + ".txt")) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
tests = {}
for label, rc, secs in rows(".tests"):
    text = open(os.path.join(res, f"tests-{label}.txt")).read()
    m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
    tests[label] = {"exit": int(rc), "seconds": float(secs), "result": m.group(0) if m else "no result line",
                    "measured": [l for l in text.splitlines() if "rel err" in l or "forward " in l or "pool:" in l or "method" in l][:80]}
timings = {label: {"exit": int(rc), "seconds": float(secs), "json": last_json(label)} for label, rc, secs in rows(".timings")}
out = {
    "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"), "device": dev or "unknown", "driver": driver or "unknown",
    "commit": commit.strip(), "command": "scripts/gpu-check.sh", "lib_dirs": os.environ.get("ORWCFM_CUDA_LIB_DIRS"),
    "tests": tests, "timings": timings,
}
slug = re.sub(r"[^A-Za-z0-9]+", "-", dev or "gpu").strip("-").lower()
path = os.path.join(out_dir, f"{datetime.date.today().isoformat()}-{slug}.json")
json.dump(out, open(path, "w"), indent=2)
print("wrote", path)
ok = all(t["exit"] == 0 for t in tests.values()) and all(t["exit"] == 0 for t in timings.values())
print("GPU CHECK", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
rc=${PIPESTATUS[0]}
# the logs travel back from the device machine ($OUT keeps at most 8 files)
if [ -n "${OUT:-}" ]; then
    cp "$LOG" "$WORK/tests-cudnn.txt" "$WORK/tests-gemm.txt" "$WORK/train_cuda.txt" "$OUT/" 2>/dev/null
fi
echo "logs in $WORK"
exit "$rc"
