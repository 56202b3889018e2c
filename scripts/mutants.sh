#!/usr/bin/env bash
# Mutation testing of the pure modules, one file at a time, each against the
# tests that guard it: scripts/mutants.sh [file ...] (default: all below).
#
# Installs cargo-mutants when missing. Every mutant is a rebuild and a test
# run, so this takes minutes per file on two cores: it is kept out of
# .ci/run. A surviving mutant is a test to write, or a line in the
# "equivalent mutants" list of the issue that ran it, with the reason.
# Results go to mutants.out/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || cargo install cargo-mutants --locked

# file → the test targets that guard it (unit tests always run).
tests_for() {
    case "$1" in
        src/key.rs) echo "--test keys --test replay --test retry" ;;
        src/fingerprint/mod.rs | src/fingerprint/body.rs) echo "--test replay --test retry --test fingerprint" ;;
        src/record.rs) echo "--test codec --test codec_bomb" ;;
        src/problem.rs | src/headers.rs) echo "--test replay --test retry" ;;
        src/config.rs) echo "--test retry --test faults --test shutdown" ;;
        src/backend/memory.rs) echo "--test backend_conformance --test concurrency" ;;
        src/flow.rs | src/settle.rs) echo "--test faults --test replay --test retry --test shutdown --test tower_http --test metrics" ;;
        *) echo "" ;;
    esac
}

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    files=(src/key.rs src/fingerprint/mod.rs src/fingerprint/body.rs src/record.rs src/problem.rs
        src/headers.rs src/config.rs src/backend/memory.rs src/flow.rs src/settle.rs)
fi
for file in "${files[@]}"; do
    echo "==> mutants in $file"
    out="mutants.out/$(basename "$file" .rs)"
    mkdir -p "$out"
    # The targets go to every cargo command, the build included: otherwise
    # each mutant builds every test target and example (25 s instead of 3).
    # --copy-target: the copy reuses the built dependencies.
    read -ra targets <<<"--lib $(tests_for "$file")"
    cargo_args=()
    for word in "${targets[@]}"; do cargo_args+=("--cargo-arg=$word"); done
    cargo mutants --file "$file" --all-features --copy-target true --output "$out" \
        "${cargo_args[@]}" || true
done
