#!/usr/bin/env bash
# One-shot accelerator benchmark (see benchmarks/gpu/bench.py): attention kernels, the 3B GRPO
# update (MFU, peak memory vs plan), rollout decode bandwidth, compile times -> JSON after each
# section. Budget: <= 8 minutes on one H200.
#   benchmarks/gpu/run.sh [--out=$OUT/gpu_bench.json] [--sections=attention,update,rollout]
#   benchmarks/gpu/run.sh --dry_run     # CPU, tiny shapes (tests/benchmarks/test_gpu_bench.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python benchmarks/gpu/bench.py "$@"
