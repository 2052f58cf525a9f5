#!/usr/bin/env bash
# backup-compare.sh: evsd backups (to the local store and to a loopback S3 server) next to restic.
#
# Usage:
#   benches/backup-compare.sh               # SIZE=4G: a few minutes
#   SIZE=1G KEEP=1 benches/backup-compare.sh
#
# What it does:
#   * Builds evsd and evsctl in release mode (`cargo build --release -p evsd -p evsctl`) unless
#     EVSD_BIN and EVSCTL_BIN point at binaries.
#   * Makes a SIZE image file: the first half random data (/dev/urandom), the second half zeroes
#     (a hole). Starts two evsd daemons, each with its own data dir, a volume `bench` of SIZE
#     (`--create-volume`) filled from the image with nbdcopy (Unix socket), `--metrics-listen off`:
#       A: the default backup store (file://DATA_DIR/backups)
#       B: `--backup-store s3://evsd-bench/evsd` on s3s-fs (the S3 test server, on 127.0.0.1 with
#          its own root dir), credentials and endpoint from the AWS_* environment variables.
#     The volume is copied out to a file with nbdcopy: that file is what restic backs up.
#   * Timed rows (wall clock; before each row `sync` and a wait until both daemons are idle,
#     no cache dropping):
#       full backup         `evsctl backup create bench --wait`          | `restic backup FILE`
#       incremental backup  after CHANGE_PCT% random 4 KiB writes, the same offsets and data in
#                           the volume (nbdsh pwrite, flushed) and in the file (pwrite + fsync),
#                           not timed; then `evsctl backup create bench --wait` | `restic backup FILE`
#       restore             `evsctl volume create NEW --from-backup ID --wait` (the incremental)
#                           | `restic restore latest --target DIR`
#     each once against the local store (daemon A, restic repo in a local directory) and once
#     against S3 (daemon B, restic repo `s3:http://127.0.0.1:PORT/evsd-bench/restic` on the same
#     s3s-fs; when restic cannot use it the restic S3 cells show "-").
#     restic 0.14 (Debian): repository format 2 (zstd, compression auto), RESTIC_PASSWORD set,
#     default options otherwise.
#   * Per evsd row: seconds, GB/s (SIZE / seconds, GB = 1e9 bytes) and the daemon's CPU seconds
#     (utime+stime delta from /proc/PID/stat, all threads; evsctl's own CPU is not counted);
#     restic seconds and the restic process's CPU seconds (bash `times`, children); speedup =
#     restic seconds / evsd seconds (> 1: evsd is faster). Also: bytes each backup stored (evsd's
#     new_stored_bytes, restic's "Added to the repo"), store sizes on disk.
#   * VERIFY=1 (default): the restored volumes (copied out with nbdcopy) and restic's restored
#     file are compared with the changed image (cmp); a mismatch fails the run.
#
# Environment:
#   SIZE=4G            volume size (K/M/G suffix, a multiple of 4 MiB)
#   CHANGE_PCT=1       share of 4 KiB blocks rewritten before the incremental (4G, 1%: 10486)
#   CHANGE_LAYOUT=scattered  scattered: the blocks are spread uniformly over the volume, so
#                      nearly every 4 MiB chunk changes (10486 blocks over 1024 chunks);
#                      clustered: the same number of blocks in one region of CHANGE_PCT%
#   KEEP=0             1: keep the work dir (default: removed at exit)
#   WORKDIR=<new dir under /var/tmp>
#   VERIFY=1           0: skip the cmp checks
#   RESTIC_S3=1        0: skip the restic rows against S3
#   EVSD_BIN, EVSCTL_BIN   use these binaries instead of building
#   EVSD_ARGS="..."    extra evsd arguments (both daemons)
#   EVSD_S3S_FS        the s3s-fs binary (default: PATH, then ~/.cache/evsd-test-tools/bin)
#   PERF_ROWS="..."    rows (e.g. "incr-local") during which `perf record -g` samples the daemon;
#                      the profile is WORKDIR/ROW.perf.data (use with KEEP=1)
#
# Requires: nbdcopy, nbdsh (python3-libnbd), restic, s3s-fs, jq, python3, awk, cmp, getconf.
# `bash scripts/install-test-deps.sh` installs all of them. The machine has 2 cores shared by
# the daemon, the store and the client tools: compare the columns with each other.
set -euo pipefail

SIZE=${SIZE:-4G}
CHANGE_PCT=${CHANGE_PCT:-1}
CHANGE_LAYOUT=${CHANGE_LAYOUT:-scattered}
case "$CHANGE_LAYOUT" in scattered|clustered) ;; *) echo "backup-compare: CHANGE_LAYOUT is scattered or clustered" >&2; exit 1 ;; esac
KEEP=${KEEP:-0}
PERF_ROWS=${PERF_ROWS:-}
VERIFY=${VERIFY:-1}
RESTIC_S3=${RESTIC_S3:-1}
EVSD_ARGS=${EVSD_ARGS:-}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

die() { echo "backup-compare: $*" >&2; exit 1; }
log() { echo "backup-compare: $*" >&2; }

# nbdsh runs `python3 -m nbd`: the system python has the libnbd binding, a pyenv one does not.
export PATH="/usr/bin:/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"

for t in nbdcopy nbdsh restic jq python3 awk cmp getconf; do
  command -v "$t" >/dev/null 2>&1 || die "missing tool '$t' (run: bash scripts/install-test-deps.sh)"
done
S3S_FS=${EVSD_S3S_FS:-$(command -v s3s-fs || echo "${EVSD_TEST_TOOLS:-$HOME/.cache/evsd-test-tools}/bin/s3s-fs")}
[ -x "$S3S_FS" ] || die "missing the S3 test server s3s-fs ($S3S_FS; run: bash scripts/install-test-deps.sh)"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || die "python3 module nbd missing (Debian package python3-libnbd)"

SIZE_BYTES=$(to_bytes "$SIZE")
(( SIZE_BYTES > 0 && SIZE_BYTES % (4 * 1024 * 1024) == 0 )) || die "SIZE=$SIZE is not a positive multiple of 4 MiB"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- binaries
if [ -z "${EVSD_BIN:-}" ] || [ -z "${EVSCTL_BIN:-}" ]; then
  log "building evsd and evsctl (release)"
  (cd "$REPO" && cargo build --release -p evsd -p evsctl >&2)
  tdir=${CARGO_TARGET_DIR:-$REPO/target}
  EVSD_BIN=${EVSD_BIN:-$tdir/release/evsd}
  EVSCTL_BIN=${EVSCTL_BIN:-$tdir/release/evsctl}
fi
[ -x "$EVSD_BIN" ] || die "evsd binary $EVSD_BIN not found"
[ -x "$EVSCTL_BIN" ] || die "evsctl binary $EVSCTL_BIN not found"

# ---------------------------------------------------------------- work dir, cleanup
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/evsd-backup-compare.XXXXXX)}
mkdir -p "$WORKDIR"
log "work dir $WORKDIR"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] || continue
    if kill -0 "$p" 2>/dev/null; then
      kill "$p" 2>/dev/null || true
      wait "$p" 2>/dev/null || true
    fi
  done
  if [ "$KEEP" = 1 ]; then
    log "kept work dir $WORKDIR"
  else
    rm -rf "$WORKDIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }

# ---------------------------------------------------------------- S3 server
S3_BUCKET=evsd-bench
S3_ROOT=$WORKDIR/s3-root
S3_PORT=$(free_port)
mkdir -p "$S3_ROOT/$S3_BUCKET"    # s3s-fs: a bucket is a directory under its root
export AWS_ACCESS_KEY_ID=EVSDBENCHACCESSKEY
export AWS_SECRET_ACCESS_KEY=evsd-bench-secret-key-0123456789
export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT=http://127.0.0.1:$S3_PORT AWS_ALLOW_HTTP=true
RUST_LOG=warn "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" \
  --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_ROOT" \
  >"$WORKDIR/s3s-fs.log" 2>&1 &
S3_PID=$!
PIDS+=("$S3_PID")
for _ in $(seq 1 200); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; then break; fi
  kill -0 "$S3_PID" 2>/dev/null || die "s3s-fs exited early: $(tail -20 "$WORKDIR/s3s-fs.log")"
  sleep 0.05
done
(exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null || die "s3s-fs does not accept connections on port $S3_PORT"
log "s3s-fs on 127.0.0.1:$S3_PORT (root $S3_ROOT)"

# ---------------------------------------------------------------- daemons
# start_daemon NAME [evsd args...]: sets PID_<NAME>, URI_<NAME>, SOCK_<NAME> (admin socket)
start_daemon() {
  local name=$1; shift
  local dir=$WORKDIR/evsd-$name
  mkdir -p "$dir/data"
  rm -f "$dir/ready.json"
  # shellcheck disable=SC2086
  "$EVSD_BIN" --data-dir "$dir/data" --no-default-volume --create-volume "bench:$SIZE_BYTES" \
    --listen 127.0.0.1:0 --unix "$dir/nbd.sock" --admin-socket "$dir/admin.sock" \
    --metrics-listen off --ready-file "$dir/ready.json" "$@" $EVSD_ARGS \
    >>"$dir/evsd.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 300); do
    [ -s "$dir/ready.json" ] && break
    kill -0 "$pid" 2>/dev/null || die "evsd $name exited early: $(tail -20 "$dir/evsd.log")"
    sleep 0.1
  done
  [ -s "$dir/ready.json" ] || die "evsd $name wrote no ready file (log: $dir/evsd.log)"
  printf -v "PID_$name" '%s' "$pid"
  printf -v "URI_$name" '%s' "nbd+unix:///bench?socket=$dir/nbd.sock"
  printf -v "SOCK_$name" '%s' "$dir/admin.sock"
}

evsctl() {  # evsctl NAME ARGS...
  local sock_var="SOCK_$1"; shift
  "$EVSCTL_BIN" --socket "${!sock_var}" "$@"
}

# The newest complete backup of volume bench.
latest_backup() {
  evsctl "$1" --json backup list --volume bench \
    | jq -er '[.backups[] | select(.state == "complete")] | last | .id'
}
backup_field() {  # NAME ID FIELD
  evsctl "$1" --json backup show "$2" | jq -r ".$3"
}

# ---------------------------------------------------------------- image, fill
IMG=$WORKDIR/image.raw
HALF=$(( SIZE_BYTES / 2 ))
log "writing $SIZE image: $(( HALF / 1048576 )) MiB random, then zeroes"
head -c "$HALF" /dev/urandom > "$IMG"
truncate -s "$SIZE_BYTES" "$IMG"

start_daemon A
start_daemon B --backup-store "s3://$S3_BUCKET/evsd"
for d in A B; do
  uri_var="URI_$d"
  log "filling volume bench on daemon $d (nbdcopy)"
  nbdcopy --target-is-zero --flush "$IMG" "${!uri_var}"
done
# What restic backs up: the volume's content, copied out of evsd.
FILE_DIR=$WORKDIR/restic-src
mkdir -p "$FILE_DIR"
FILE=$FILE_DIR/bench.img
log "copying the volume out to $FILE (nbdcopy)"
nbdcopy "$URI_A" "$FILE"
if [ "$VERIFY" = 1 ]; then cmp "$IMG" "$FILE" || die "volume content differs from the image it was filled with"; fi
rm -f "$IMG"

# ---------------------------------------------------------------- restic repos
export RESTIC_PASSWORD=evsd-bench
export RESTIC_CACHE_DIR=$WORKDIR/restic-cache
RREPO_local=$WORKDIR/restic-repo
RREPO_s3=s3:http://127.0.0.1:$S3_PORT/$S3_BUCKET/restic
RESTIC_STORES="local"
RESTIC_FAILED=""
restic -q -r "$RREPO_local" init >"$WORKDIR/restic-init-local.log" 2>&1 \
  || die "restic init (local) failed: $(cat "$WORKDIR/restic-init-local.log")"
if [ "$RESTIC_S3" = 1 ]; then
  if restic -q -r "$RREPO_s3" init >"$WORKDIR/restic-init-s3.log" 2>&1; then
    RESTIC_STORES="local s3"
  else
    log "restic cannot use s3s-fs; restic S3 cells stay empty: $(tail -5 "$WORKDIR/restic-init-s3.log")"
  fi
fi

# ---------------------------------------------------------------- measurement helpers
RESULTS=$WORKDIR/results.csv
echo "row,tool,seconds,cpu_seconds,stored_bytes" > "$RESULTS"
record() {  # ROW TOOL SECONDS CPU_SECONDS STORED_BYTES (the last two may be empty)
  echo "$1,$2,$3,$4,$5" >> "$RESULTS"
  log "$1 $2: ${3} s${4:+, CPU ${4} s}${5:+, stored $5 bytes}"
}

# Waits (at most 30 s) until both daemons are idle: at most one CPU tick between them over
# 300 ms. A daemon goes on working after a backup has ended (releasing the previous backup base
# merges snapshot layers), and the next row must not share the machine with that.
settle_daemons() {
  local a b
  for _ in $(seq 1 100); do
    a=$(( $(cpu_ticks "$PID_A") + $(cpu_ticks "$PID_B") ))
    sleep 0.3
    b=$(( $(cpu_ticks "$PID_A") + $(cpu_ticks "$PID_B") ))
    [ $((b - a)) -le 1 ] && return 0
  done
  log "warning: the daemons did not go idle within 30 s"
}

# evsd_row ROW DAEMON CMD...: time CMD, record the daemon's CPU; sets ELAPSED
evsd_row() {
  local row=$1 d=$2; shift 2
  local pid_var="PID_$d" c0 c1 t0 t1
  sync
  settle_daemons
  local perf_pid=""
  if [[ " $PERF_ROWS " == *" $row "* ]]; then
    perf record -q -g -F 2000 -p "${!pid_var}" -o "$WORKDIR/$row.perf.data" 2>"$WORKDIR/$row.perf.err" &
    perf_pid=$!
    sleep 0.5  # perf attaches before the row starts
  fi
  c0=$(cpu_ticks "${!pid_var}")
  t0=$(now)
  "$@" >"$WORKDIR/$row.out" 2>"$WORKDIR/$row.err" \
    || die "$row failed: $(tail -20 "$WORKDIR/$row.err") (daemon log: $WORKDIR/evsd-$d/evsd.log)"
  t1=$(now)
  c1=$(cpu_ticks "${!pid_var}")
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  EVSD_CPU=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / t }')
}

evsd_backup_row() {  # ROW DAEMON
  local row=$1 d=$2 id
  evsd_row "$row" "$d" evsctl "$d" backup create bench --wait
  id=$(latest_backup "$d") || die "$row: no complete backup listed after backup create --wait"
  record "$row" evsd "$ELAPSED" "$EVSD_CPU" "$(backup_field "$d" "$id" new_stored_bytes)"
}

# restic_row ROW STORE ARGS...: time `restic -r REPO ARGS`; sets ELAPSED, RESTIC_ADDED
restic_row() {
  local row=$1 store=$2; shift 2
  local repo_var="RREPO_$store" t0 t1 c0 c1
  sync
  settle_daemons
  children_cpu; c0=$CHILDREN_CPU
  t0=$(now)
  if ! restic -r "${!repo_var}" "$@" >"$WORKDIR/$row.restic.out" 2>"$WORKDIR/$row.restic.err"; then
    # restic's S3 restores from s3s-fs fail now and then ("There were N errors"): that is the
    # peer's row, not a reason to lose evsd's. Its cells show "-".
    [ "$store" = s3 ] || die "restic $row failed: $(tail -20 "$WORKDIR/$row.restic.err")"
    log "restic $row failed, its cells show '-': $(tail -3 "$WORKDIR/$row.restic.err")"
    RESTIC_FAILED="$RESTIC_FAILED $row"
    return 1
  fi
  t1=$(now)
  children_cpu; c1=$CHILDREN_CPU
  ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  RESTIC_CPU=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
  # "Added to the repository: 65.012 MiB (64.008 MiB stored)" (restic 0.14 backup summary):
  # the stored (compressed) figure, like evsd's new_stored_bytes.
  RESTIC_ADDED=$(sed -n 's/^Added to the repo[a-z]*: .*(\([0-9.]*\) \([KMGT]*i*B\) stored).*/\1 \2/p' \
    "$WORKDIR/$row.restic.out" | awk '{
      m = 1; if ($2 == "KiB") m = 1024; else if ($2 == "MiB") m = 1048576;
      else if ($2 == "GiB") m = 1073741824; else if ($2 == "TiB") m = 1099511627776;
      printf "%.0f", $1 * m }')
  RESTIC_ADDED=${RESTIC_ADDED:-0}
}

restic_backup_row() {  # ROW STORE
  if restic_row "$1" "$2" backup --host bench "$FILE_DIR"; then
    record "$1" restic "$ELAPSED" "$RESTIC_CPU" "$RESTIC_ADDED"
  fi
}

# ---------------------------------------------------------------- full backups
evsd_backup_row full-local A
evsd_backup_row full-s3 B
FULL_A=$(latest_backup A)
FULL_B=$(latest_backup B)
for s in $RESTIC_STORES; do restic_backup_row "full-$s" "$s"; done

# ---------------------------------------------------------------- the change
BLOCKS=$(( SIZE_BYTES / 4096 ))
NWRITES=$(awk -v b="$BLOCKS" -v p="$CHANGE_PCT" 'BEGIN { printf "%d", b * p / 100 + 0.5 }')
PATCH=$WORKDIR/patch.bin
log "changing $NWRITES random 4 KiB blocks (${CHANGE_PCT}%, $CHANGE_LAYOUT) in the volumes and in $FILE"
# patch.bin: NWRITES records of an 8-byte LE offset + 4096 random bytes; distinct blocks.
/usr/bin/python3 - "$PATCH" "$BLOCKS" "$NWRITES" "$CHANGE_LAYOUT" <<'EOF'
import os, random, struct, sys
path, blocks, n, layout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(20261202)
if layout == "clustered":
    # One region of n blocks at a random offset (a file rewritten, a log segment).
    start = rng.randrange(0, blocks - n + 1)
    chosen = range(start, start + n)
else:
    # Spread uniformly over the whole volume.
    chosen = rng.sample(range(blocks), n)
with open(path, "wb") as f:
    for b in chosen:
        f.write(struct.pack("<Q", b * 4096))
        f.write(os.urandom(4096))
EOF
apply_patch_py='
import struct
def records(path):
    with open(path, "rb") as f:
        while True:
            rec = f.read(8 + 4096)
            if not rec:
                return
            yield struct.unpack("<Q", rec[:8])[0], rec[8:]
'
for d in A B; do
  uri_var="URI_$d"
  nbdsh -u "${!uri_var}" -c "$apply_patch_py
for off, data in records('$PATCH'):
    h.pwrite(data, off)
h.flush()
" || die "applying the change to daemon $d's volume failed"
done
/usr/bin/python3 -c "$apply_patch_py
import os
fd = os.open('$FILE', os.O_WRONLY)
for off, data in records('$PATCH'):
    os.pwrite(fd, data, off)
os.fsync(fd)
os.close(fd)
"

# ---------------------------------------------------------------- incremental backups
evsd_backup_row incr-local A
evsd_backup_row incr-s3 B
INCR_A=$(latest_backup A)
INCR_B=$(latest_backup B)
[ "$INCR_A" != "$FULL_A" ] || die "the incremental backup on A has the full backup's id"
[ "$INCR_B" != "$FULL_B" ] || die "the incremental backup on B has the full backup's id"
for d in A B; do
  id_var="INCR_$d"
  [ "$(backup_field "$d" "${!id_var}" incremental)" = true ] \
    || log "warning: backup ${!id_var} on daemon $d is not marked incremental"
done
for s in $RESTIC_STORES; do restic_backup_row "incr-$s" "$s"; done

# ---------------------------------------------------------------- restores
evsd_restore_row() {  # ROW DAEMON ID
  evsd_row "$1" "$2" evsctl "$2" volume create restored --from-backup "$3" --wait
  record "$1" evsd "$ELAPSED" "$EVSD_CPU" ""
}
evsd_restore_row restore-local A "$INCR_A"
evsd_restore_row restore-s3 B "$INCR_B"
for s in $RESTIC_STORES; do
  rm -rf "$WORKDIR/restic-restore-$s"
  restic_row "restore-$s" "$s" restore latest --host bench --target "$WORKDIR/restic-restore-$s" \
    && record "restore-$s" restic "$ELAPSED" "$RESTIC_CPU" ""
done

if [ "$VERIFY" = 1 ]; then
  for d in A B; do
    out=$WORKDIR/restored-$d.img
    nbdcopy "nbd+unix:///restored?socket=$WORKDIR/evsd-$d/nbd.sock" "$out"
    cmp "$FILE" "$out" || die "volume restored on daemon $d differs from the changed image"
    rm -f "$out"
    log "verified: restore on daemon $d is byte-identical"
  done
  for s in $RESTIC_STORES; do
    case " $RESTIC_FAILED " in *" restore-$s "*) continue ;; esac
    r=$(find "$WORKDIR/restic-restore-$s" -type f -name bench.img | head -1)
    [ -n "$r" ] || die "restic restore ($s) produced no bench.img"
    cmp "$FILE" "$r" || die "restic's restore ($s) differs from the changed image"
    log "verified: restic restore ($s) is byte-identical"
  done
fi

# ---------------------------------------------------------------- report
du_b() { du -sb "$1" 2>/dev/null | awk '{print $1}' | grep . || echo 0; }
echo
echo "backup-compare: SIZE=$SIZE (half random, half zero), change ${CHANGE_PCT}% = $NWRITES x 4 KiB;" \
     "evsd $("$EVSD_BIN" --version 2>/dev/null | awk '{print $NF}'), $(restic version | awk '{print $1, $2}'), s3s-fs on loopback"
awk -F, -v size="$SIZE_BYTES" '
NR == 1 { next }
{
  key = $1
  if (!(key in seen)) { seen[key] = 1; keys[++n] = key }
  sec[key, $2] = $3; cpu[key, $2] = $4; stored[key, $2] = $5
}
function mib(b) { return (b == "") ? "-" : sprintf("%.1f", b / 1048576) }
END {
  printf "%-14s | %8s | %9s | %10s | %9s | %8s | %12s | %11s | %8s\n", "row", "evsd s", "evsd GB/s", "evsd CPU s", "evsd MiB+", "restic s", "restic CPU s", "restic MiB+", "speedup"
  printf "---------------+----------+-----------+------------+-----------+----------+--------------+-------------+---------\n"
  for (i = 1; i <= n; i++) {
    k = keys[i]
    es = ((k, "evsd") in sec) ? sec[k, "evsd"] : ""
    rs = ((k, "restic") in sec) ? sec[k, "restic"] : ""
    gbs = (es != "" && es > 0) ? sprintf("%.2f", size / 1e9 / es) : "-"
    sp = (es != "" && rs != "" && es > 0) ? sprintf("%.2fx", rs / es) : "-"
    printf "%-14s | %8s | %9s | %10s | %9s | %8s | %12s | %11s | %8s\n", k,
      (es == "" ? "-" : es), gbs, (((k, "evsd") in cpu) ? cpu[k, "evsd"] : "-"),
      (((k, "evsd") in stored) ? mib(stored[k, "evsd"]) : "-"),
      (rs == "" ? "-" : rs), (((k, "restic") in cpu) ? cpu[k, "restic"] : "-"),
      (((k, "restic") in stored) ? mib(stored[k, "restic"]) : "-"), sp
  }
  if (("full-local", "evsd") in sec && ("incr-local", "evsd") in sec && sec["full-local", "evsd"] > 0)
    printf "\nincremental / full time (local): %.1f%%\n", 100 * sec["incr-local", "evsd"] / sec["full-local", "evsd"]
  if (("full-s3", "evsd") in sec && ("incr-s3", "evsd") in sec && sec["full-s3", "evsd"] > 0)
    printf "incremental / full time (s3):    %.1f%%\n", 100 * sec["incr-s3", "evsd"] / sec["full-s3", "evsd"]
}' "$RESULTS"
echo "GB/s = $SIZE / seconds (GB = 1e9 bytes); evsd CPU = the daemon's; restic CPU = the restic process's;" \
     "MiB+ = bytes the backup added to its store; speedup = restic s / evsd s (> 1: evsd faster)"
echo "store sizes: evsd local $(( $(du_b "$WORKDIR/evsd-A/data/backups") / 1048576 )) MiB," \
     "evsd s3 $(( $(du_b "$S3_ROOT/$S3_BUCKET/evsd") / 1048576 )) MiB," \
     "restic local $(( $(du_b "$RREPO_local") / 1048576 )) MiB"
echo "raw results: $RESULTS$([ "$KEEP" = 1 ] || echo ' (removed at exit; KEEP=1 keeps it)')"
