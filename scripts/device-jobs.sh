#!/usr/bin/env bash
# Benchmark and test jobs for the GPU machine, run from a folder of release binaries built
# here (no Rust needed there):
#
#   scripts/device-jobs.sh build             # here: the GPU tests (scripts/gpu-test.sh build),
#                                            # ma2mba, gpu_bench and ssd_bench, stripped and
#                                            # xz-compressed into gpubin/ (git-ignored)
#   bash gpubin/device-jobs.sh JOB...        # there, e.g. through the device tool with gpubin
#                                            # carried; logs under $OUT (or /tmp)
#
# Jobs:
#   tests   the GPU tests and compute-sanitizer memcheck (gpu-test.sh run)
#   ssd     the SSD alone at PERFORMANCE.md's shapes against the reference (ssd_bench)
#   fb      mamba2-130m forward and training step, B = 8, L = 2048, per kernel kind
#   fb16    the same with bf16 activations
#   big16   mamba2-2.7b training with the planner at L = 2^16 (budget 90GB, TF32), $STEPS
#           steps (default 2); nvidia-smi and host RSS sampled alongside
#   big19   the same at L = 2^19 (budget 110GB), $STEPS steps (default 1)
#   ncu     Nsight Compute on one launch of the SSD kernel whose name matches $NCU_KERNEL
#           (a regex, e.g. 'grad_[0-9]+_mask_tiled$'), skipping $NCU_SKIP matching launches first
#           (default 0), in `ssd_bench $NCU_SHAPE` (default 80,1,8192) with only the bf16
#           variants: $OUT/ncu.txt (the full set of sections) and $OUT/ncu-sass.csv (per SASS
#           instruction), summarized by ncu-summary.py (stall reasons, instruction mix)
# $ACT (f32 or bf16, default f32) is how the big jobs store activations.
# $LIMIT caps a training job's seconds (defaults 380 and 560: one device call is 600 s).
set -uo pipefail

case "${1:-}" in
build)
  cd "$(dirname "$0")/.."
  export LLVM_SYS_191_PREFIX="${LLVM_SYS_191_PREFIX:-/usr/lib/llvm-19}"
  scripts/gpu-test.sh build
  cargo build --release --features cuda --bin ma2mba --example gpu_bench --example ssd_bench
  dir="${CARGO_TARGET_DIR:-target}/release"
  for b in ma2mba examples/gpu_bench examples/ssd_bench; do
    strip -o "gpubin/$(basename "$b")" "$dir/$b"
    xz -T2 -f "gpubin/$(basename "$b")"
  done
  cp scripts/device-jobs.sh scripts/ncu-summary.py gpubin/
  ls -l gpubin
  exit 0
  ;;
esac

cd "$(dirname "$0")"
out="${OUT:-/tmp}"
unpack() {
  [ -x "/tmp/$1" ] && return
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1] + '.xz'), open('/tmp/' + sys.argv[1], 'wb'))" "$1"
  chmod +x "/tmp/$1"
}
tokens() { # random ids below mamba2-2.7b's vocabulary, u32
  [ -f /tmp/tok.u32 ] || python3 -c "
import random, array
random.seed(1)
array.array('I', (random.randrange(50000) for _ in range(1100000))).tofile(open('/tmp/tok.u32', 'wb'))"
}
big() { # seq budget steps limit
  unpack ma2mba
  tokens
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 2 \
    >"$out/smi-$1.log" 2>&1 &
  local smi=$!
  (while sleep 5; do ps -o rss=,pcpu= -C ma2mba | head -1; done) >"$out/host-$1.log" 2>&1 &
  local host=$!
  local start
  start=$(date +%s)
  timeout "$4" /tmp/ma2mba train mamba2-2.7b --data /tmp/tok.u32 --seq-len "$1" --batch 1 \
    --budget "$2" --device cuda --tf32 --activations "${ACT:-f32}" --steps "$3" --log-every 1 2>&1 |
    tee "$out/train-$1-${ACT:-f32}.log" | tail -20
  echo "train $1: rc=${PIPESTATUS[0]} in $(($(date +%s) - start)) s"
  kill "$smi" "$host" 2>/dev/null
  awk -F, '{gsub(/ MiB/, "", $2); if ($2 + 0 > m) m = $2 + 0} END {print "nvidia-smi peak MiB", m}' \
    "$out/smi-$1.log"
  tail -2 "$out/host-$1.log"
}
for job in "$@"; do
  echo "=== $job $(date +%T)"
  case $job in
  tests) bash gpu-test.sh run ;;
  ssd) unpack ssd_bench && timeout 200 /tmp/ssd_bench 2>&1 | tee "$out/ssd.log" | grep "^|" ;;
  fb) unpack gpu_bench && timeout 200 /tmp/gpu_bench mamba2-130m both 8 2048 2>&1 | tee "$out/fb.log" | tail -40 ;;
  fb16) unpack gpu_bench && timeout 200 /tmp/gpu_bench mamba2-130m both 8 2048 bf16 2>&1 | tee "$out/fb16.log" | tail -40 ;;
  big16) big 65536 90GB "${STEPS:-2}" "${LIMIT:-380}" ;;
  big19) big 524288 110GB "${STEPS:-1}" "${LIMIT:-560}" ;;
  ncu)
    unpack ssd_bench
    sel=(--clock-control none -k "regex:${NCU_KERNEL:?set NCU_KERNEL}" --launch-skip "${NCU_SKIP:-0}" -c 1)
    SSD_BF16=1 timeout 150 ncu "${sel[@]}" --set full /tmp/ssd_bench "${NCU_SHAPE:-80,1,8192}" \
      >"$out/ncu.txt" 2>&1
    grep -E "^  [a-z_0-9]+ \(|Duration|DRAM Throughput|Registers Per|Achieved Occ|Warp Cycles Per Issued" \
      "$out/ncu.txt" | head -8
    SSD_BF16=1 timeout 150 ncu "${sel[@]}" --section SourceCounters --section WarpStateStats \
      --page source --print-source sass --csv /tmp/ssd_bench "${NCU_SHAPE:-80,1,8192}" \
      >"$out/ncu-sass.csv" 2>&1
    python3 ncu-summary.py "$out/ncu-sass.csv" 12
    ;;
  *) echo "unknown job $job (tests, ssd, fb, fb16, big16, big19, ncu)" ;;
  esac
done
