#!/usr/bin/env bash
# Runs the load-test matrices behind docs/PERFORMANCE.md and prints their tables.
#   docs/perf-matrix.sh hol          # per-space streams vs --single-stream at 0/1/2/5% loss, 20 ms delay
#   docs/perf-matrix.sh lag          # lag at 10,000 entries/s at 0/1/5% loss, 20 ms delay
#   docs/perf-matrix.sh compression  # none / lz4 / zstd on the load-test payload
#   docs/perf-matrix.sh cc           # cubic vs bbr under random loss and a bandwidth cap
#   docs/perf-matrix.sh table FILES  # the table of saved reports
# Reports (JSON) go to target/perf/. Needs python3 for the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = table ] || cargo build --release --example loadtest -q
out=target/perf; mkdir -p "$out"
lt() { ./target/release/examples/loadtest --quiet "$@"; }
SECS=${SECS:-15s}

table() { python3 - "$@" <<'PY'
import json, sys
rows = []
for path in sys.argv[1:]:
    r = json.load(open(path))
    c, lag = r["config"], r["replicas"][0]["lag_ms"]
    cpu = (r.get("cpu") or {}).get("us_per_entry")
    rows.append((path.split("/")[-1][:-5], r["verified"], r["throughput"]["entries_per_s"], r["throughput"]["payload_mb_per_s"],
                 r["throughput"]["wire_mb_per_s"], r["compression"]["ratio"], lag["p50"], lag["p99"], lag["max"],
                 r["append_latency_us"]["p99"], cpu if cpu is not None else float("nan"), r["converge_ms"]))
print(f"| run | verified | entries/s | payload MB/s | wire MB/s | ratio | lag p50 ms | lag p99 ms | lag max ms | append p99 us | CPU us/entry | converge ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for x in rows:
    print("| " + " | ".join([x[0], str(x[1]).lower()] + [f"{v:.0f}" if i == 0 else f"{v:.2f}" for i, v in enumerate(x[2:-1])] + [f"{x[-1]:.0f}" if x[-1] is not None else "-"]) + " |")
PY
}

case "${1:-}" in
hol)
  files=()
  for loss in 0% 1% 2% 5%; do
    for mode in per-space single-stream; do
      f="$out/hol-${mode}-loss${loss%\%}.json"; files+=("$f")
      flag=(); [ "$mode" = single-stream ] && flag=(--single-stream)
      lt --replicas 1 --spaces 64 --rate 10000 --duration "$SECS" --loss "$loss" --delay 20ms --seed 7 "${flag[@]}" --report-json "$f" >/dev/null
    done
  done
  table "${files[@]}" ;;
lag)
  files=()
  for loss in 0% 1% 5%; do
    f="$out/lag-loss${loss%\%}.json"; files+=("$f")
    lt --replicas 2 --spaces 64 --rate 10000 --duration "$SECS" --loss "$loss" --delay 20ms --seed 3 --report-json "$f" >/dev/null
  done
  table "${files[@]}" ;;
compression)
  files=()
  for c in none lz4 zstd; do
    f="$out/compression-$c.json"; files+=("$f")
    lt --replicas 1 --spaces 16 --rate max --duration 5s --compression "$c" --seed 5 --report-json "$f" >/dev/null
  done
  table "${files[@]}" ;;
cc)
  files=()
  for cc in cubic bbr; do
    f="$out/cc-$cc-loss1.json"; files+=("$f")
    lt --replicas 1 --spaces 64 --rate 10000 --duration "$SECS" --loss 1% --delay 20ms --congestion "$cc" --seed 9 --report-json "$f" >/dev/null
    f="$out/cc-$cc-cap12mbit.json"; files+=("$f")
    lt --replicas 1 --spaces 64 --rate 10000 --duration "$SECS" --link-rate 12mbit --loss 0.5% --delay 20ms --congestion "$cc" --seed 9 --report-json "$f" >/dev/null
  done
  table "${files[@]}" ;;
table) shift; table "$@" ;;
*) sed -n '2,9p' "$0"; exit 2 ;;
esac
