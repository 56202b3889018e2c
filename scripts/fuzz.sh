#!/usr/bin/env bash
# Runs each fuzz target for a while: scripts/fuzz.sh [seconds per target]
# Installs cargo-fuzz when missing. libFuzzer's flags need nightly features;
# RUSTC_BOOTSTRAP lets the stable toolchain use them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in key_parse record_decode; do
    echo "==> fuzz $target for ${secs}s"
    cargo fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
