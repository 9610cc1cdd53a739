#!/usr/bin/env bash
# Triton's perf_analyzer against a running server: decoupled streaming over gRPC.
#
#   bench/perf_analyzer.sh [-u HOST:PORT] [-m MODEL] [-c CONCURRENCY_RANGE] [-t INTERVAL_MS]
#                          [-d INPUT_JSON] [-- extra perf_analyzer flags]
#
# Defaults: -u 127.0.0.1:8001 -m smollm2 -c 1:4:1 -t 5000 -d clients/perf_analyzer_input.json.
# Start a server first: `python -m pagedserve serve` (ours), or `python -m tests.triton_ref` (real
# Triton serving the echo model `echo_vllm`, for comparison). perf_analyzer prints, per
# concurrency, throughput (infer/sec) and latency (avg, p50/p90/p95/p99, in usec); this script
# also writes them as CSV to bench/results/perf_analyzer.csv (-f to change).
#
# The binary ships in the tritonclient 2.41.0 wheel (.venv/bin/perf_analyzer). It links
# libb64.so.0d and libcudart.so.12 (unused without a GPU); when the system lacks them (no
# `apt-get install libb64-0d`, no `pip install nvidia-cuda-runtime-cu12`), the copies bundled in
# the nvidia-pytriton wheel (make setup-dev) are linked under their sonames in a temp folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
URL=127.0.0.1:8001
MODEL=smollm2
CONCURRENCY=1:4:1
INTERVAL=5000
INPUT="$ROOT/clients/perf_analyzer_input.json"
CSV="$ROOT/bench/results/perf_analyzer.csv"

while getopts "u:m:c:t:d:f:h" opt; do
  case "$opt" in
    u) URL="$OPTARG" ;;
    m) MODEL="$OPTARG" ;;
    c) CONCURRENCY="$OPTARG" ;;
    t) INTERVAL="$OPTARG" ;;
    d) INPUT="$OPTARG" ;;
    f) CSV="$OPTARG" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

PA="$VENV/bin/perf_analyzer"
[ -x "$PA" ] || { echo "no $PA: run make setup-dev (tritonclient==2.41.0)" >&2; exit 1; }

# Supply the two shared libraries from the pytriton wheel when the loader cannot find them.
# ldd's output is read whole: `grep -q` would quit at the first match, and under pipefail the
# SIGPIPE it leaves ldd with would make the test false.
if ldd "$PA" | grep "not found" > /dev/null; then
  LIBS="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia_pytriton.libs 2>/dev/null | head -1)"
  [ -n "$LIBS" ] || { echo "perf_analyzer lacks libraries and nvidia-pytriton is not installed" >&2; exit 1; }
  SHIM="$(mktemp -d)"
  trap 'rm -rf "$SHIM"' EXIT
  ln -s "$(ls "$LIBS"/libb64-*.so.0d | head -1)" "$SHIM/libb64.so.0d"
  ln -s "$(ls "$LIBS"/libcudart-*.so.12* | head -1)" "$SHIM/libcudart.so.12"
  export LD_LIBRARY_PATH="$SHIM${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

mkdir -p "$(dirname "$CSV")"
# Decoupled models need --async --streaming over gRPC; latency is then that of the first
# response (perf_analyzer: "using the first response for measuring latency").
"$PA" -m "$MODEL" -i grpc -u "$URL" --async --streaming \
  --input-data "$INPUT" --concurrency-range "$CONCURRENCY" \
  --measurement-interval "$INTERVAL" --stability-percentage 50 --max-trials 5 \
  --percentile 95 -f "$CSV" "$@"
echo "CSV: $CSV"
