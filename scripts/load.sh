#!/usr/bin/env bash
# The performance picture in one command: scripts/load.sh [seconds] [connections]
#
# 1. End-to-end load (benches/load.rs): builds the examples and the peer
#    crates' servers (bench/peers, its own workspace) in release mode, starts
#    each configuration (no layer, memory, Redis, SQLite, PostgreSQL in its
#    modes, `idempotent`, `axum-idempotent`) pinned to one core, drives them
#    from the other in interleaved rounds (LOAD_ROUNDS, default 3), measures
#    what Redis and PostgreSQL allow for the layer's own scripts and
#    statements in the same rounds (redis-limit, postgres-limit), counts the
#    backends' work per request and prints markdown tables.
# 2. Instructions per request in the application's process, per backend
#    (scripts/instructions.sh under callgrind; LOAD_INSTRUCTIONS=0 skips it).
#
# Needs Redis on REDIS_URL (default redis://127.0.0.1:6379), PostgreSQL on
# DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test), pgbench
# and valgrind. LOAD_CONFIGS=none,memory and LOAD_MODES=fresh run subsets.
set -euo pipefail
cd "$(dirname "$0")/.."
export LOAD_ROUNDS=${LOAD_ROUNDS:-3}
cargo build --release --features redis,postgres,sqlite --examples
# `idempotent` 2 declares rust-version 1.98 and builds with older toolchains.
cargo build --release --ignore-rust-version --manifest-path bench/peers/Cargo.toml --bins
cargo bench --features redis,postgres,sqlite --bench load -- "$@"
if [ "${LOAD_INSTRUCTIONS:-1}" != 0 ]; then
    echo
    INSTRUCTIONS_BACKENDS=${INSTRUCTIONS_BACKENDS:-memory,redis,postgres,sqlite} scripts/instructions.sh "" 1000
fi
