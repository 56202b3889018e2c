#!/usr/bin/env bash
# End-to-end load of the payments example: scripts/load.sh [seconds] [connections]
# Builds the examples in release mode, then runs benches/load.rs, which starts
# each configuration (no layer, memory, Redis, PostgreSQL) and prints a
# markdown table. Needs Redis on REDIS_URL (default redis://127.0.0.1:6379)
# and PostgreSQL on DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features redis,postgres --examples
cargo bench --features redis,postgres --bench load -- "$@"
