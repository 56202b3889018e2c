#!/usr/bin/env bash
# End-to-end load of the payments example: scripts/load.sh [seconds] [connections]
# Builds the examples in release mode, then runs benches/load.rs, which starts
# each configuration (no layer, memory, Redis) and prints a markdown table.
# Needs Redis on REDIS_URL (default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features redis --examples
cargo bench --features redis --bench load -- "$@"
