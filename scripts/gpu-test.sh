#!/usr/bin/env bash
# The GPU tests, built here and run on a machine with an NVIDIA GPU (no Rust needed there).
#
#   scripts/gpu-test.sh build   # here: release test binary (LLVM linked in), stripped and
#                               # xz-compressed into gpubin/ (git-ignored), with this script
#   bash gpubin/gpu-test.sh run # there: unpacks it, runs tests/gpu.rs with the GPU required,
#                               # then compute-sanitizer memcheck on the tiny models and
#                               # the SSD op;
#                               # logs under $OUT (or /tmp)
#
# `build` needs llvm-19-dev (LLVM_SYS_191_PREFIX=/usr/lib/llvm-19) as .ci/run installs it.
# `run` needs libcuda on the loader path; libcublas is found by the runtime where CUDA and
# pip install it. Set SANITIZE=0 to skip the memcheck pass.
set -euo pipefail

case "${1:-}" in
build)
  cd "$(dirname "$0")/.."
  export LLVM_SYS_191_PREFIX="${LLVM_SYS_191_PREFIX:-/usr/lib/llvm-19}"
  bin=$(cargo test --release --features cuda --test gpu --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -n 1)
  mkdir -p gpubin
  strip -o gpubin/gpu-test "$bin"
  xz -T2 -6 -f gpubin/gpu-test
  cp scripts/gpu-test.sh gpubin/gpu-test.sh
  ls -l gpubin
  ;;
run)
  cd "$(dirname "$0")"
  out="${OUT:-/tmp}"
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('gpu-test.xz'), open('/tmp/gpu-test', 'wb'))"
  chmod +x /tmp/gpu-test
  nvidia-smi -L || true
  export MA2MBA_REQUIRE_GPU=1 RUST_BACKTRACE=1
  start=$(date +%s)
  rc=0
  timeout 420 /tmp/gpu-test --test-threads=1 --nocapture >"$out/gpu-test.log" 2>&1 || rc=$?
  echo "gpu tests: rc=$rc in $(($(date +%s) - start)) s"
  grep -E "skipped|bit-identical|kernels, |logits|loss|gradients; |bf16|panicked|test result" \
    "$out/gpu-test.log" | grep -v "layers\." | cut -c1-200 || true
  if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    start=$(date +%s)
    mrc=0
    timeout 120 compute-sanitizer --tool memcheck --print-limit 20 /tmp/gpu-test tiny ssd_ checkpointed_bf16 updates_on \
      --test-threads=1 >"$out/memcheck.log" 2>&1 || mrc=$?
    echo "memcheck: rc=$mrc in $(($(date +%s) - start)) s"
    grep -E "ERROR SUMMARY|Invalid|test result" "$out/memcheck.log" | head -20 || true
    [ "$mrc" = 0 ] || rc=$mrc
  fi
  exit "$rc"
  ;;
*)
  echo "usage: $0 build | run" >&2
  exit 2
  ;;
esac
