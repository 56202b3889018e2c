#!/usr/bin/env bash
# Instructions per request (callgrind), per backend, this checkout and
# optionally an earlier revision, built from the same benches/instructions.rs:
#
#   scripts/instructions.sh [revision] [requests]
#
# For each backend (INSTRUCTIONS_BACKENDS, default memory; also redis,
# postgres, sqlite) and mode (none, nokey, replay, fresh) the program runs
# under `valgrind --tool=callgrind` with 0 and with <requests> (default
# 2000) requests after the same warm-up; the difference over <requests> is
# the cost of one request in this process, whatever else the machine does
# (runs of the same binary differ by a few hundred instructions: the hash
# maps are randomly keyed). "over none" subtracts the bare handler's count.
# An earlier revision must have the backends' features. Needs valgrind
# (Debian package valgrind), and Redis / PostgreSQL for those backends
# (REDIS_URL, DATABASE_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-}
n=${2:-2000}
backends=${INSTRUCTIONS_BACKENDS:-memory}
build() { # <manifest dir> <target dir> [features] → path of the built program
    (cd "$1" && cargo bench --bench instructions --target-dir "$2" ${3:+--features "$3"} --no-run --message-format=json 2>/dev/null) |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instructions" and m.get("executable"):
        print(m["executable"])'
}
count() { # <program> <mode> <requests> <backend> → instructions
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" "$2" "$3" "$4" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
features=
[ "$backends" = memory ] || features=redis,postgres,sqlite
programs=("this:$(build . "$PWD/target" "$features")")
if [ -n "$rev" ]; then
    short=$(git rev-parse --short "$rev")
    dir="target/before-$short"
    [ -d "$dir" ] || git worktree add --detach "$dir" "$rev" >/dev/null
    cp benches/instructions.rs "$dir/benches/instructions.rs"
    mkdir -p "$dir/tests/sqlite_files"
    cp tests/sqlite_files/mod.rs "$dir/tests/sqlite_files/mod.rs"
    grep -q 'name = "instructions"' "$dir/Cargo.toml" ||
        printf '\n[[bench]]\nname = "instructions"\nharness = false\n' >>"$dir/Cargo.toml"
    programs+=("$short:$(build "$dir" "$PWD/target/before-build" "$features")")
fi
echo "| backend | mode | build | instructions per request | over none |"
echo "|---|---|---|---|---|"
declare -A none
for backend in ${backends//,/ }; do
    for mode in none nokey replay fresh; do
        for entry in "${programs[@]}"; do
            name=${entry%%:*}
            program=${entry#*:}
            zero=$(count "$program" "$mode" 0 "$backend")
            many=$(count "$program" "$mode" "$n" "$backend")
            per=$(( (many - zero) / n ))
            [ "$mode" = none ] && none[$name]=$per
            echo "| $backend | $mode | $name | $per | +$(( per - ${none[$name]} )) |"
        done
    done
done
