#!/usr/bin/env bash
# What a change costs: the memory example of this checkout against the same
# example built from an earlier revision, in one run of the load harness.
#
#   scripts/before-after.sh <revision> [seconds] [connections]
#
# Builds the earlier revision's `payments` example in a worktree under
# target/ (release), builds this checkout's examples, then runs
# benches/load.rs with LOAD_BEFORE_BIN set: configurations `none`, `memory`
# and `memory-before`, modes `fresh`, `replay` and `nokey` (pass-through),
# measured mode by mode, back to back. LOAD_CONFIGS / LOAD_MODES override.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/before-after.sh <revision> [seconds] [connections]}
shift
short=$(git rev-parse --short "$rev")
dir="target/before-$short"
[ -d "$dir" ] || git worktree add --detach "$dir" "$rev" >/dev/null
cargo build --release --example payments --manifest-path "$dir/Cargo.toml" \
    --target-dir target/before-build
cargo build --release --features redis,postgres,sqlite --examples
LOAD_BEFORE_BIN="$PWD/target/before-build/release/examples/payments" \
LOAD_CONFIGS="${LOAD_CONFIGS:-none,memory,memory-before}" \
LOAD_MODES="${LOAD_MODES:-fresh,replay,nokey}" \
    cargo bench --features redis,postgres,sqlite --bench load -- "$@"
