#!/usr/bin/env bash
# End-to-end load of the payments example: scripts/load.sh [seconds] [connections]
# Builds the examples and the peer crates' servers (bench/peers, its own
# workspace) in release mode, then runs benches/load.rs, which starts each
# configuration (no layer, memory, Redis, SQLite, PostgreSQL, `idempotent`,
# `axum-idempotent`), drives it, counts the backends' work per request and
# prints markdown tables. Needs Redis on REDIS_URL (default
# redis://127.0.0.1:6379) and PostgreSQL on DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/test). LOAD_CONFIGS=none,memory runs a
# subset.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features redis,postgres,sqlite --examples
# `idempotent` 2 declares rust-version 1.98 and builds with older toolchains.
cargo build --release --ignore-rust-version --manifest-path bench/peers/Cargo.toml --bins
cargo bench --features redis,postgres,sqlite --bench load -- "$@"
