#!/usr/bin/env bash
# What a PostgreSQL mode's writes cost the server, without the layer: the
# statements of one fresh request, driven by pgbench (8 clients, 2 threads)
# against the tables and functions `migrate()` makes, interleaved, the
# median of three rounds. scripts/pg-lease-cost.sh [seconds per run]
#
#   lease          the lease function, then the fenced record update
#   lease-async    the same, the lease write with synchronous_commit = off
#                  (SET LOCAL, that transaction only)
#   advisory       the advisory begin function, the fenced write, the unlock
#
# pgbench sends statements one at a time, so the advisory script pays one
# round trip more than the layer does (which pipelines the unlock). Needs
# DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test) and the
# debug build of the payments_postgres example (it runs the migration).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
table=idem_pgbench
cargo build -q --features postgres --example payments_postgres
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# The example migrates at start-up; stop it once it listens.
DATABASE_URL=$url IDEMPOTENCY_TABLE=$table ADDR=127.0.0.1:0 \
    target/debug/examples/payments_postgres >"$dir/out" &
server=$!
until grep -q listening "$dir/out"; do
    kill -0 "$server" 2>/dev/null || { echo "the example did not start" >&2; exit 1; }
    sleep 0.1
done
kill "$server"
key="decode(lpad(to_hex(:k::bigint), 64, '0'), 'hex')"
cat >"$dir/lease.sql" <<SQL
\set k random(1, 1000000000000)
SELECT state FROM ${table}_lease(:k::bigint, $key, '\x00'::bytea, '\x01'::bytea, 10000);
UPDATE $table SET record = '\x00', lock_token = NULL, expires_at = now() + interval '1 hour' WHERE key = $key AND lock_token = '\x01' AND record IS NULL AND expires_at > clock_timestamp();
SQL
cat >"$dir/lease-async.sql" <<SQL
\set k random(1, 1000000000000)
SELECT set_config('synchronous_commit', 'off', true), (SELECT state FROM ${table}_lease(:k::bigint, $key, '\x00'::bytea, '\x01'::bytea, 10000));
UPDATE $table SET record = '\x00', lock_token = NULL, expires_at = now() + interval '1 hour' WHERE key = $key AND lock_token = '\x01' AND record IS NULL AND expires_at > clock_timestamp();
SQL
cat >"$dir/advisory.sql" <<SQL
\set k random(1, 1000000000000)
SELECT state FROM ${table}_begin(:k::bigint, $key);
SELECT ${table}_complete_session(:k::bigint, $key, '\x00'::bytea, '\x00'::bytea, 3600000);
SELECT pg_advisory_unlock(:k::bigint);
SQL
declare -A results
for round in 1 2 3; do
    for script in lease lease-async advisory; do
        tps=$(pgbench -n -M prepared -c 8 -j 2 -T "$secs" -f "$dir/$script.sql" "$url" 2>/dev/null |
            sed -n 's/^tps = \([0-9]*\)\..*/\1/p')
        results[$script]+="$tps "
        echo "round $round $script: $tps tps" >&2
    done
done
psql -q "$url" -c "DROP TABLE $table" >/dev/null
echo "| script | fresh requests/s (median of 3) | runs |"
echo "|---|---|---|"
for script in lease lease-async advisory; do
    read -r -a runs <<<"${results[$script]}"
    median=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n 2p)
    echo "| $script | $median | ${runs[*]} |"
done
