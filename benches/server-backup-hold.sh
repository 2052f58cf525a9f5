#!/usr/bin/env bash
# server-backup-hold.sh: how long a server backup's barrier holds writes on its volumes while
# clients write to all of them at full speed (issue 6's target: under 10 ms).
#
# Usage:
#   benches/server-backup-hold.sh            # ~1 min
#   VOLUMES=4 SETS=20 benches/server-backup-hold.sh
#
# Starts a release evsd on a temporary data dir (Unix socket only), creates VOLUMES volumes of
# SIZE and a server holding them, runs fio (nbd engine, 4 KiB randwrite, IODEPTH, one job per
# volume) against all of them, and meanwhile takes SETS server backups (`evsctl server backup
# --wait`, GAP_MS apart). Prints each set's barrier hold (writes held on every member, from
# the first gate taken to the last released, as the daemon measures it) with p50/p90/max, and
# fio's write IOPS over the run.
#
# Environment: VOLUMES=3 SIZE=1G SETS=10 GAP_MS=300 IODEPTH=16 KEEP=0 EVSD_BIN EVSCTL_BIN
set -euo pipefail

VOLUMES=${VOLUMES:-3}
SIZE=${SIZE:-1G}
SETS=${SETS:-10}
GAP_MS=${GAP_MS:-300}
IODEPTH=${IODEPTH:-16}
KEEP=${KEEP:-0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

for t in fio jq awk; do
  command -v "$t" >/dev/null 2>&1 || { echo "server-backup-hold: missing $t (bash scripts/install-test-deps.sh)" >&2; exit 1; }
done
if [ -z "${EVSD_BIN:-}" ] || [ -z "${EVSCTL_BIN:-}" ]; then
  (cd "$REPO" && cargo build --release -q -p evsd -p evsctl)
  EVSD_BIN=${EVSD_BIN:-$REPO/target/release/evsd}
  EVSCTL_BIN=${EVSCTL_BIN:-$REPO/target/release/evsctl}
  [ -n "${CARGO_TARGET_DIR:-}" ] && { EVSD_BIN=$CARGO_TARGET_DIR/release/evsd; EVSCTL_BIN=$CARGO_TARGET_DIR/release/evsctl; }
fi

WORK=$(mktemp -d /var/tmp/evsd-hold.XXXXXX)
EVSD_PID=""
FIO_PID=""
cleanup() {
  [ -n "$FIO_PID" ] && kill "$FIO_PID" 2>/dev/null || true
  [ -n "$EVSD_PID" ] && kill "$EVSD_PID" 2>/dev/null && wait "$EVSD_PID" 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

SOCK=$WORK/nbd.sock
"$EVSD_BIN" --data-dir "$WORK/data" --no-default-volume --listen off --unix "$SOCK" \
  --metrics-listen off --ready-file "$WORK/ready.json" >"$WORK/evsd.log" 2>&1 &
EVSD_PID=$!
for _ in $(seq 100); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
[ -s "$WORK/ready.json" ] || { echo "evsd did not start: $(tail "$WORK/evsd.log")" >&2; exit 1; }
ctl() { "$EVSCTL_BIN" --socket "$WORK/data/admin.sock" "$@"; }

members=()
fio_jobs=()
for i in $(seq "$VOLUMES"); do
  ctl volume create "v$i" --size "$SIZE" >/dev/null
  members+=(--volume "v$i")
  fio_jobs+=(--name="v$i" --uri="nbd+unix:///v$i?socket=$SOCK")
done
ctl server create web "${members[@]}" >/dev/null

# fio runs until every set is taken (it is stopped then); each set reads every chunk fio touched.
RUNTIME=3600
fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth="$IODEPTH" --size="$SIZE" --norandommap \
  --time_based --runtime="$RUNTIME" --group_reporting --output-format=json \
  "${fio_jobs[@]}" >"$WORK/fio.json" 2>"$WORK/fio.err" &
FIO_PID=$!
sleep 3

: >"$WORK/holds"
for _ in $(seq "$SETS"); do
  kill -0 "$FIO_PID" 2>/dev/null || { echo "fio stopped early: $(tail -5 "$WORK/fio.err")" >&2; exit 1; }
  ctl --json server backup web --wait >"$WORK/set.json" 2>/dev/null
  jq -r '.barrier_hold_us' "$WORK/set.json" >>"$WORK/holds"
  sleep "$(awk -v m="$GAP_MS" 'BEGIN { printf "%.3f", m / 1000 }')"
done
kill -INT "$FIO_PID" 2>/dev/null || true
wait "$FIO_PID" 2>/dev/null || true
FIO_PID=""

iops=$(sed -n '/^{/,$p' "$WORK/fio.json" | jq -r '.jobs[0].write.iops | floor' 2>/dev/null || echo "?")
echo "server backups of $VOLUMES x $SIZE volumes under fio 4k randwrite (iodepth $IODEPTH per volume):"
echo "  barrier hold per set (ms): $(awk '{ printf "%.2f ", $1 / 1000 }' "$WORK/holds")"
sort -n "$WORK/holds" | awk '{ v[NR] = $1 } END {
  p50 = v[int((NR + 1) / 2)]; p90 = v[int(NR * 0.9 + 0.999)]; if (p90 == "") p90 = v[NR];
  printf "  p50 %.2f ms, p90 %.2f ms, max %.2f ms over %d sets\n", p50 / 1000, p90 / 1000, v[NR] / 1000, NR }'
echo "  fio write IOPS over the run (all volumes): $iops"
