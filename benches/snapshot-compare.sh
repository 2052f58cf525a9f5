#!/usr/bin/env bash
# snapshot-compare.sh: what snapshots cost in evsd, next to qemu-nbd serving a qcow2 backing chain.
#
# Usage:
#   benches/snapshot-compare.sh              # ~2-3 min at RUNTIME=5
#   RUNTIME=3 PARTS="io" benches/snapshot-compare.sh
#
# Three measurements, printed as one report at the end:
#
#   1. 4 KiB randread and randwrite IOPS against snapshot depth (DEPTHS, default 0 8 32).
#      evsd: one 1 GiB volume per depth, filled with 1 GiB of random data (nbdcopy), then for
#      i = 0 .. depth-1: write region i (the i-th 1/32 of the volume, 32 MiB, qemu-io
#      `write -P`) and `evsctl snapshot create`. So depth N = N frozen layers that hold data
#      under an empty head.
#      qemu-nbd: the same content as a qcow2 backing chain: c0.qcow2 = the random image
#      converted to qcow2 (fully allocated) with region 0 written into it (qemu-io), then
#      c_i = `qemu-img create -f qcow2 -b c_{i-1} -F qcow2` with region i written into it; depth
#      N serves a fresh empty overlay over c_{N-1} (N images under the top, as in evsd); depth 0
#      serves a separate fully allocated qcow2 copy of the random image. qemu-nbd runs with
#      `-f qcow2 --aio=io_uring --cache=writeback --shared=8 -t` (as in peer-compare.sh) and the
#      qcow2 defaults (64 KiB clusters: a 4 KiB write into an empty overlay copies its cluster up;
#      QCOW2_OPTS="-o cluster_size=4k" changes that for the overlays).
#      fio: nbd ioengine (libnbd), bs=4k, iodepth IODEPTH (16), numjobs 1, the whole volume,
#      time_based RUNTIME seconds, randread first then randwrite (each depth's volume/overlay is
#      used only for its own depth, so the randwrite never ends up under a later snapshot).
#      Before each run: sync, and the backing files read into the page cache.
#      Both servers listen on a Unix socket; only one server runs at a time.
#      Printed: IOPS per depth and the ratio deepest/shallowest per server (target for evsd:
#      >= 0.90), and the MiB read from the disk during each run (/proc/diskstats): this VM may
#      drop the page cache behind our back, and a run that read from disk measured the disk.
#
#   2. snapshot.create latency on a 1 GiB and a 1 TiB sparse volume: CREATES (20) creates,
#      CREATE_GAP_MS (100) apart, while fio randwrite (4k, iodepth IODEPTH, norandommap, over
#      the whole volume) runs against it. Each create is one request on a fresh admin-socket
#      connection, timed from connect() to the response line. ADMIN_CLIENT=python (default):
#      a python3 helper started once, timing in-process with perf_counter_ns (no process
#      start-up in the figure). ADMIN_CLIENT=socat: `date +%s%N` around
#      `printf REQ | socat - UNIX-CONNECT:admin.sock` (includes socat's fork/exec, ~1 ms).
#      Printed: p50, p99 (nearest rank: with 20 samples p99 is the maximum) and max in ms.
#
#   3. Merge throughput of snapshot.delete, on an idle volume of 4 x MERGE_MIB:
#      "into frozen layer": write MERGE_MIB at 0 (qemu-io), snapshot m1, write MERGE_MIB
#      at MERGE_MIB, snapshot m2, write MERGE_MIB at 2 x MERGE_MIB into the head, sync, then time
#      `snapshot.delete m1`: m1's layer is merged into m2's (the blocks m2 lacks: MERGE_MIB).
#      "into live head": write MERGE_MIB at 0, snapshot h1, write MERGE_MIB at MERGE_MIB into
#      the head, sync, time `snapshot.delete h1`: h1's layer is merged into the head.
#      Printed: bytes merged (the daemon's `merged layers` log event, copied_bytes), wall time of
#      the delete request (the answer comes after the merge and the survivor's fsync), MiB/s =
#      bytes merged / wall time, and the daemon's own merge_secs.
#
# Environment:
#   RUNTIME=5              seconds per fio run in part 1
#   IODEPTH=16             fio iodepth (parts 1 and 2)
#   DEPTHS="0 8 32"        snapshot depths for part 1 (each 0..32; ratio = last/first)
#   CREATES=20             snapshot creates per volume in part 2
#   CREATE_GAP_MS=100      pause between two creates
#   MERGE_MIB=256          data per layer in part 3
#   PARTS="io create merge"
#   SERVERS="evsd qemu-nbd"  servers for part 1 (parts 2 and 3 are evsd only)
#   ADMIN_CLIENT=python    or socat (see part 2)
#   QCOW2_OPTS=""          extra `qemu-img create` options for the qemu overlays
#   EVSD_BIN, EVSCTL_BIN   binaries (default: ${CARGO_TARGET_DIR:-target}/release/{evsd,evsctl},
#                          built with `cargo build --release -p evsd -p evsctl` when missing)
#   EVSD_ARGS="..."        extra evsd arguments
#   WORKDIR=<new dir under /var/tmp>  logs and results stay; volume data and images are removed
#                          at exit unless KEEP_DATA=1
#
# Requires: fio (with the nbd engine), qemu-nbd, qemu-img, qemu-io, nbdcopy, nbdinfo, jq, awk,
# python3 (and socat for ADMIN_CLIENT=socat). `bash scripts/install-test-deps.sh` installs them.
# The machine's CPUs are shared by fio and the server: compare within one run.
set -euo pipefail

RUNTIME=${RUNTIME:-5}
IODEPTH=${IODEPTH:-16}
DEPTHS=${DEPTHS:-"0 8 32"}
CREATES=${CREATES:-20}
CREATE_GAP_MS=${CREATE_GAP_MS:-100}
MERGE_MIB=${MERGE_MIB:-256}
PARTS=${PARTS:-"io create merge"}
SERVERS=${SERVERS:-"evsd qemu-nbd"}
ADMIN_CLIENT=${ADMIN_CLIENT:-python}
QCOW2_OPTS=${QCOW2_OPTS:-}
EVSD_ARGS=${EVSD_ARGS:-}
KEEP_DATA=${KEEP_DATA:-0}

SIZE_BYTES=$(( 1024 * 1024 * 1024 ))
REGIONS=32
REGION_BYTES=$(( SIZE_BYTES / REGIONS ))

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "snapshot-compare: $*" >&2; exit 1; }
log() { echo "snapshot-compare: $(date +%T) $*" >&2; }
has_part() { [[ " $PARTS " == *" $1 "* ]]; }
has_server() { [[ " $SERVERS " == *" $1 "* ]]; }

for t in fio qemu-nbd qemu-img qemu-io nbdcopy nbdinfo jq awk python3; do
  command -v "$t" >/dev/null 2>&1 || die "missing tool '$t' (run: bash scripts/install-test-deps.sh)"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine"
case "$ADMIN_CLIENT" in
  python) ;;
  socat) command -v socat >/dev/null 2>&1 || die "ADMIN_CLIENT=socat needs socat" ;;
  *) die "ADMIN_CLIENT must be python or socat" ;;
esac
for d in $DEPTHS; do
  [[ "$d" =~ ^[0-9]+$ ]] && [ "$d" -le "$REGIONS" ] || die "depths must be 0..$REGIONS (got $d)"
done
read -r -a DEPTH_LIST <<<"$DEPTHS"
MAX_DEPTH=0
for d in "${DEPTH_LIST[@]}"; do [ "$d" -gt "$MAX_DEPTH" ] && MAX_DEPTH=$d; done

# ---------------------------------------------------------------- binaries
TDIR=${CARGO_TARGET_DIR:-$REPO/target}
EVSD_BIN=${EVSD_BIN:-$TDIR/release/evsd}
EVSCTL_BIN=${EVSCTL_BIN:-$TDIR/release/evsctl}
if [ ! -x "$EVSD_BIN" ] || [ ! -x "$EVSCTL_BIN" ]; then
  log "building evsd and evsctl (release) into $TDIR"
  (cd "$REPO" && cargo build --release -p evsd -p evsctl >&2)
fi
[ -x "$EVSD_BIN" ] || die "evsd binary $EVSD_BIN not found"
[ -x "$EVSCTL_BIN" ] || die "evsctl binary $EVSCTL_BIN not found"

# ---------------------------------------------------------------- work dir
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/evsd-snapshot-compare.XXXXXX)}
mkdir -p "$WORKDIR"
DATA=$WORKDIR/evsd-data
ADMIN_SOCK=$DATA/admin.sock
NBD_SOCK=$WORKDIR/nbd.sock
QDIR=$WORKDIR/qcow2
IMG=$WORKDIR/random.img
EVSD_LOG=$WORKDIR/evsd.log
RESULTS=$WORKDIR/results.txt
log "work dir $WORKDIR"
: > "$RESULTS"

SERVER_PID=""
FIO_PID=""
stop_pid() {
  local pid=$1
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
cleanup() {
  stop_pid "$FIO_PID"; FIO_PID=""
  stop_pid "$SERVER_PID"; SERVER_PID=""
  if [ "$KEEP_DATA" != 1 ]; then
    rm -rf "$DATA" "$QDIR" "$IMG"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- python helper
HELPER_PY=$WORKDIR/helper.py
cat > "$HELPER_PY" <<'EOF'
"""evsd admin-socket client (one request per connection, timed in-process) and page-cache warmer."""
import json, os, socket, sys, time

def request(path, method, params):
    t0 = time.perf_counter_ns()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    r = s.makefile("rb")
    r.readline()  # greeting
    s.sendall((json.dumps({"id": 1, "method": method, "params": params}) + "\n").encode())
    line = r.readline()
    t1 = time.perf_counter_ns()
    r.close()
    s.close()
    resp = json.loads(line)
    if "error" in resp:
        sys.exit(f"{method} {json.dumps(params)}: {resp['error']}")
    return (t1 - t0) / 1e6, resp["result"]

cmd = sys.argv[1]
if cmd == "call":  # call SOCK METHOD PARAMS_JSON -> "<ms> <result json>"
    ms, result = request(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    print(f"{ms:.3f} {json.dumps(result)}")
elif cmd == "warm":  # warm FILE... : read only the data extents (SEEK_DATA/SEEK_HOLE)
    for path in sys.argv[2:]:
        fd = os.open(path, os.O_RDONLY)
        size, off = os.fstat(fd).st_size, 0
        try:
            while off < size:
                try:
                    start = os.lseek(fd, off, os.SEEK_DATA)
                except OSError:  # ENXIO: no data past off
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                pos = start
                while pos < end:
                    n = len(os.pread(fd, min(1 << 20, end - pos), pos))
                    if n == 0:
                        break
                    pos += n
                off = end
        finally:
            os.close(fd)
elif cmd == "creates":  # creates SOCK VOL COUNT GAP_MS PREFIX -> one latency (ms) per line
    path, vol, count, gap_ms, prefix = sys.argv[2:7]
    for i in range(int(count)):
        ms, _ = request(path, "snapshot.create", {"volume": vol, "name": f"{prefix}{i}"})
        print(f"{ms:.3f}", flush=True)
        time.sleep(int(gap_ms) / 1000)
else:
    sys.exit(f"unknown command {cmd}")
EOF

# admin_call METHOD PARAMS_JSON -> "<ms> <result json>"
admin_call() {
  if [ "$ADMIN_CLIENT" = python ]; then
    python3 "$HELPER_PY" call "$ADMIN_SOCK" "$1" "$2"
  else
    local req t0 t1 out
    req=$(jq -cn --arg m "$1" --argjson p "$2" '{id: 1, method: $m, params: $p}')
    t0=$(date +%s%N)
    out=$(printf '%s\n' "$req" | socat -t 600 - "UNIX-CONNECT:$ADMIN_SOCK")
    t1=$(date +%s%N)
    out=$(printf '%s\n' "$out" | tail -n 1)
    jq -e 'has("result")' <<<"$out" >/dev/null || { echo "$1 $2: $out" >&2; return 1; }
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e6 }') $(jq -c .result <<<"$out")"
  fi
}

# timed_creates VOL COUNT GAP_MS PREFIX -> one latency (ms) per line
timed_creates() {
  if [ "$ADMIN_CLIENT" = python ]; then
    python3 "$HELPER_PY" creates "$ADMIN_SOCK" "$1" "$2" "$3" "$4"
  else
    local i
    for i in $(seq 0 $(( $2 - 1 ))); do
      admin_call snapshot.create "{\"volume\":\"$1\",\"name\":\"$4$i\"}" | awk '{ print $1 }'
      sleep "$(awk -v g="$3" 'BEGIN { print g / 1000 }')"
    done
  fi
}

evsctl() { "$EVSCTL_BIN" --socket "$ADMIN_SOCK" "$@"; }

# ---------------------------------------------------------------- servers
wait_uri() {
  local uri=$1
  for _ in $(seq 1 200); do
    if nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited early (log: $WORKDIR/server.log)"
    sleep 0.05
  done
  die "server did not come up at $uri (log: $WORKDIR/server.log)"
}

start_evsd() {
  local ready=$WORKDIR/evsd.ready
  rm -f "$ready" "$NBD_SOCK"
  # shellcheck disable=SC2086
  "$EVSD_BIN" --data-dir "$DATA" --no-default-volume --listen off --unix "$NBD_SOCK" \
    --metrics-listen off --log-format json --ready-file "$ready" $EVSD_ARGS >>"$EVSD_LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 200); do
    [ -s "$ready" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "evsd exited early: $(tail -20 "$EVSD_LOG")"
    sleep 0.05
  done
  [ -s "$ready" ] || die "evsd wrote no ready file"
}

# start_qemu_nbd IMAGE
start_qemu_nbd() {
  rm -f "$NBD_SOCK"
  qemu-nbd -f qcow2 --aio=io_uring --cache=writeback --shared=8 -t -x bench -k "$NBD_SOCK" "$1" \
    >>"$WORKDIR/server.log" 2>&1 &
  SERVER_PID=$!
  wait_uri "nbd+unix:///bench?socket=$NBD_SOCK"
}

stop_server() { stop_pid "$SERVER_PID"; SERVER_PID=""; }

evsd_uri() { echo "nbd+unix:///$1?socket=$NBD_SOCK"; }

pattern() { printf '0x%02x' $(( ($1 % 250) + 1 )); }

# ---------------------------------------------------------------- fio
# The block device under WORKDIR, for the disk reads during each run (the page cache may be
# dropped behind our back on a VM; a run that read from disk measured the disk, not the server).
DISK_DEV=$(basename "$(df --output=source "$WORKDIR" | tail -1)")
grep -q " $DISK_DEV " /proc/diskstats || DISK_DEV=""
disk_read_sectors() {
  if [ -n "$DISK_DEV" ]; then awk -v d="$DISK_DEV" '$3 == d { print $6 }' /proc/diskstats; else echo 0; fi
}
declare -A DISKRD=()

# run_fio NAME URI RW KEY -> IOPS in IOPS[KEY], disk MiB read in DISKRD[KEY]
run_fio() {
  local name=$1 uri=$2 rw=$3 key=$4 out=$WORKDIR/fio-$1-$3.json r0 r1
  r0=$(disk_read_sectors)
  fio --name="$name-$rw" --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth="$IODEPTH" \
      --numjobs=1 --size="$SIZE_BYTES" --time_based=1 --runtime="$RUNTIME" \
      --group_reporting=1 --output-format=json --output="$out" >/dev/null 2>"$out.err" \
    || die "fio failed for $name/$rw: $(cat "$out.err")"
  r1=$(disk_read_sectors)
  jq -e '.jobs[0].error == 0' "$out" >/dev/null || die "fio reported an error for $name/$rw ($out)"
  IOPS[$key]=$(jq '(.jobs[0].read.iops + .jobs[0].write.iops) | floor' "$out")
  DISKRD[$key]=$(( (r1 - r0) * 512 / 1048576 ))
}

# settle FILE... : earlier writes on disk, the files' data in the page cache. Only data extents
# are read: `cat` of a sparse layer file would fill the page cache with zero pages for its holes
# (a 1 GiB file per layer) and evict the data being measured.
settle() {
  sync
  python3 "$HELPER_PY" warm "$@"
}

declare -A IOPS=()

# ================================================================ part 1: I/O vs depth
if has_part io; then
  if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -ne "$SIZE_BYTES" ]; then
    log "writing 1 GiB of random data to $IMG"
    head -c "$SIZE_BYTES" /dev/urandom > "$IMG.tmp"
    mv "$IMG.tmp" "$IMG"
  fi

  # ---- qemu-nbd over a qcow2 chain
  if has_server qemu-nbd; then
    rm -rf "$QDIR"; mkdir -p "$QDIR"
    log "qemu: building a chain of $MAX_DEPTH qcow2 images"
    if [ "$MAX_DEPTH" -gt 0 ]; then
      qemu-img convert -f raw -O qcow2 "$IMG" "$QDIR/c0.qcow2"
      for i in $(seq 0 $(( MAX_DEPTH - 1 ))); do
        if [ "$i" -gt 0 ]; then
          # shellcheck disable=SC2086
          qemu-img create -q -f qcow2 $QCOW2_OPTS -b "c$(( i - 1 )).qcow2" -F qcow2 "$QDIR/c$i.qcow2"
        fi
        qemu-io -f qcow2 "$QDIR/c$i.qcow2" \
          -c "write -P $(pattern "$i") $(( i * REGION_BYTES )) $REGION_BYTES" >/dev/null
      done
    fi
    for d in "${DEPTH_LIST[@]}"; do
      if [ "$d" -eq 0 ]; then
        top=$QDIR/d0.qcow2
        chain=("$top")
        qemu-img convert -f raw -O qcow2 "$IMG" "$top"
      else
        top=$QDIR/top$d.qcow2
        rm -f "$top"
        # shellcheck disable=SC2086
        qemu-img create -q -f qcow2 $QCOW2_OPTS -b "c$(( d - 1 )).qcow2" -F qcow2 "$top"
        chain=("$top")
        for i in $(seq 0 $(( d - 1 ))); do chain+=("$QDIR/c$i.qcow2"); done
      fi
      [ "$(qemu-img info --backing-chain "$top" | grep -c '^image:')" -eq $(( d + 1 )) ] \
        || die "qcow2 chain of $top is not $(( d + 1 )) images deep"
      start_qemu_nbd "$top"
      for rw in randread randwrite; do
        settle "${chain[@]}"
        run_fio "qemu-d$d" "nbd+unix:///bench?socket=$NBD_SOCK" "$rw" "qemu-nbd,$rw,$d"
        log "qemu-nbd depth $d $rw: ${IOPS[qemu-nbd,$rw,$d]} IOPS (disk read ${DISKRD[qemu-nbd,$rw,$d]} MiB)"
      done
      stop_server
    done
    [ "$KEEP_DATA" = 1 ] || rm -rf "$QDIR"
  fi

  # ---- evsd, one volume per depth
  if has_server evsd; then
    rm -rf "$DATA"
    start_evsd
    for d in "${DEPTH_LIST[@]}"; do
      vol=d$d
      log "evsd: building volume $vol (fill + $d snapshots)"
      evsctl volume create "$vol" --size "$SIZE_BYTES" >/dev/null
      nbdcopy -C 4 --flush "$IMG" "$(evsd_uri "$vol")"
      log "evsd: $vol filled"
      for i in $(seq 0 $(( d - 1 ))); do
        qemu-io -f raw "$(evsd_uri "$vol")" \
          -c "write -P $(pattern "$i") $(( i * REGION_BYTES )) $REGION_BYTES" >/dev/null
        evsctl snapshot create "$vol" "s$i" >/dev/null
      done
      n=$(evsctl --json snapshot list "$vol" | jq '.snapshots | length')
      [ "$n" -eq "$d" ] || die "volume $vol has $n snapshots, expected $d"
      log "evsd: $vol has $d snapshots"
      for rw in randread randwrite; do
        settle "$DATA/volumes/$vol/"*
        run_fio "evsd-d$d" "$(evsd_uri "$vol")" "$rw" "evsd,$rw,$d"
        log "evsd depth $d $rw: ${IOPS[evsd,$rw,$d]} IOPS (disk read ${DISKRD[evsd,$rw,$d]} MiB)"
      done
      # Give the space back before the next depth (and let the file system finish with it).
      evsctl volume delete "$vol" --force >/dev/null
      sync
    done
    stop_server
  fi

  {
    first=${DEPTH_LIST[0]}; last=${DEPTH_LIST[${#DEPTH_LIST[@]}-1]}
    echo "== 1. 4 KiB random IOPS vs snapshot depth (1 GiB, fio nbd engine, iodepth $IODEPTH, ${RUNTIME}s per run, unix socket)"
    printf '%-10s %-9s' workload server
    for d in "${DEPTH_LIST[@]}"; do printf ' %10s' "depth $d"; done
    printf ' %9s\n' "$last/$first"
    for rw in randread randwrite; do
      for s in evsd qemu-nbd; do
        has_server "$s" || continue
        printf '%-10s %-9s' "$rw" "$s"
        for d in "${DEPTH_LIST[@]}"; do printf ' %10s' "${IOPS[$s,$rw,$d]:--}"; done
        a=${IOPS[$s,$rw,$first]:-0}; b=${IOPS[$s,$rw,$last]:-0}
        ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "-" }')
        mark=""
        if [ "$s" = evsd ] && [ "$ratio" != - ]; then
          mark=$(awk -v r="$ratio" 'BEGIN { print (r >= 0.90) ? "  ok (>= 0.90)" : "  BELOW 0.90 target" }')
        fi
        printf ' %9s%s\n' "$ratio" "$mark"
      done
    done
    if [ -n "$DISK_DEV" ]; then
      echo "disk reads during each run, MiB ($DISK_DEV; should be ~0: the data is in the page cache):"
      for rw in randread randwrite; do
        for s in evsd qemu-nbd; do
          has_server "$s" || continue
          printf '%-10s %-9s' "$rw" "$s"
          for d in "${DEPTH_LIST[@]}"; do printf ' %10s' "${DISKRD[$s,$rw,$d]:--}"; done
          printf '\n'
        done
      done
    fi
    echo
  } >> "$RESULTS"
fi

# ================================================================ parts 2 and 3 need evsd
if has_part create || has_part merge; then
  rm -rf "$DATA"
  start_evsd
fi

# ================================================================ part 2: create latency
if has_part create; then
  rows=()
  for spec in "lat1g:1G:1 GiB" "lat1t:1T:1 TiB"; do
    IFS=: read -r vol size label <<<"$spec"
    evsctl volume create "$vol" --size "$size" >/dev/null
    vsize=$(evsctl --json volume show "$vol" | jq .size_bytes)
    out=$WORKDIR/fio-create-$vol.json
    log "evsd: $CREATES snapshot creates on $vol ($label) under fio randwrite"
    fio --name="bg-$vol" --ioengine=nbd --uri="$(evsd_uri "$vol")" --rw=randwrite --bs=4k \
        --iodepth="$IODEPTH" --numjobs=1 --size="$vsize" --norandommap=1 --randrepeat=0 \
        --time_based=1 --runtime=600 --output-format=json --output="$out" \
        >/dev/null 2>"$out.err" &
    FIO_PID=$!
    # Wait until fio is attached and writing.
    for _ in $(seq 1 100); do
      c=$(evsctl --json volume show "$vol" | jq .connections)
      [ "$c" -ge 1 ] && break
      kill -0 "$FIO_PID" 2>/dev/null || die "fio exited: $(cat "$out.err")"
      sleep 0.05
    done
    sleep 0.5
    timed_creates "$vol" "$CREATES" "$CREATE_GAP_MS" "c" > "$WORKDIR/create-$vol.ms"
    kill -0 "$FIO_PID" 2>/dev/null || die "fio stopped before the creates were done: $(cat "$out.err")"
    stop_pid "$FIO_PID"; FIO_PID=""
    # fio prints "fio: terminating on signal 15" before the JSON.
    bg_iops=$(sed -n '/^{/,$p' "$out" | jq '.jobs[0].write.iops | floor' 2>/dev/null || echo "?")
    n=$(wc -l < "$WORKDIR/create-$vol.ms")
    [ "$n" -eq "$CREATES" ] || die "only $n of $CREATES creates on $vol succeeded"
    # Nearest rank: the ceil(p * n)-th smallest.
    stats=$(sort -n "$WORKDIR/create-$vol.ms" | awk '
      { x[NR] = $1 }
      END {
        r50 = int(0.50 * NR); if (r50 < 0.50 * NR) r50++; if (r50 < 1) r50 = 1
        r99 = int(0.99 * NR); if (r99 < 0.99 * NR) r99++; if (r99 < 1) r99 = 1
        print x[r50], x[r99], x[NR], NR
      }')
    read -r p50 p99 max cnt <<<"$stats"
    rows+=("$(printf '%-8s %-7s %7d %9.2f %9.2f %9.2f %14s' "$vol" "$label" "$cnt" "$p50" "$p99" "$max" "$bg_iops")")
    log "$vol: p50 $p50 ms, p99 $p99 ms, max $max ms (fio ~$bg_iops write IOPS)"
    evsctl volume delete "$vol" --force >/dev/null
    sync
  done
  {
    echo "== 2. snapshot.create latency under fio randwrite (4k, iodepth $IODEPTH; $CREATES creates ${CREATE_GAP_MS} ms apart; client: $ADMIN_CLIENT)"
    printf '%-8s %-7s %7s %9s %9s %9s %14s\n' volume size creates "p50 ms" "p99 ms" "max ms" "fio wr IOPS"
    printf '%s\n' "${rows[@]}"
    echo
  } >> "$RESULTS"
fi

# ================================================================ part 3: merge throughput
if has_part merge; then
  M=$(( MERGE_MIB * 1024 * 1024 ))
  write_at() { # VOL OFFSET PATTERN
    qemu-io -f raw "$(evsd_uri "$1")" -c "write -P $3 $2 $M" >/dev/null
  }
  # timed_delete VOL SNAP -> "wall_ms copied_bytes merge_secs"
  timed_delete() {
    local before after line ms events
    before=$(wc -l < "$EVSD_LOG")
    line=$(admin_call snapshot.delete "{\"volume\":\"$1\",\"name\":\"$2\"}")
    ms=${line%% *}
    sleep 0.2
    after=$(tail -n +"$(( before + 1 ))" "$EVSD_LOG")
    events=$(jq -c 'select(.fields.message == "merged layers") | .fields' <<<"$after" 2>/dev/null || true)
    [ -n "$events" ] || die "no 'merged layers' log event after deleting $1@$2 (see $EVSD_LOG)"
    # A delete may merge more than one layer: sum them.
    echo "$ms $(jq -s 'map(.copied_bytes) | add' <<<"$events") $(jq -s 'map(.merge_secs) | add' <<<"$events")"
  }
  mrows=()

  log "evsd: merge into a frozen layer ($MERGE_MIB MiB)"
  evsctl volume create mf --size $(( 4 * M )) >/dev/null
  write_at mf 0 0x11;        evsctl snapshot create mf m1 >/dev/null
  write_at mf "$M" 0x22;     evsctl snapshot create mf m2 >/dev/null
  write_at mf $(( 2 * M )) 0x33
  sync
  res=$(timed_delete mf m1)
  read -r ms bytes msecs <<<"$res"
  mrows+=("into frozen layer|$ms|$bytes|$msecs")
  qemu-io -f raw -r "$(evsd_uri mf)" -c "read -P 0x11 0 $M" -c "read -P 0x22 $M $M" \
    -c "read -P 0x33 $(( 2 * M )) $M" >/dev/null || die "mf reads wrong data after the merge"
  evsctl volume delete mf --force >/dev/null
  sync

  log "evsd: merge into the live head ($MERGE_MIB MiB)"
  evsctl volume create mh --size $(( 4 * M )) >/dev/null
  write_at mh 0 0x44;        evsctl snapshot create mh h1 >/dev/null
  write_at mh "$M" 0x55
  sync
  res=$(timed_delete mh h1)
  read -r ms bytes msecs <<<"$res"
  mrows+=("into live head|$ms|$bytes|$msecs")
  qemu-io -f raw -r "$(evsd_uri mh)" -c "read -P 0x44 0 $M" -c "read -P 0x55 $M $M" >/dev/null \
    || die "mh reads wrong data after the merge"
  evsctl volume delete mh --force >/dev/null

  {
    echo "== 3. merge throughput of snapshot.delete (idle volume, $MERGE_MIB MiB per layer)"
    printf '%-18s %11s %10s %9s %15s\n' case "merged MiB" "delete s" "MiB/s" "daemon merge s"
    for r in "${mrows[@]}"; do
      IFS='|' read -r label ms bytes msecs <<<"$r"
      awk -v l="$label" -v ms="$ms" -v b="$bytes" -v m="$msecs" 'BEGIN {
        mib = b / 1048576; s = ms / 1000
        printf "%-18s %11.1f %10.3f %9.1f %15.3f\n", l, mib, s, (s > 0 ? mib / s : 0), m
      }'
    done
    echo
  } >> "$RESULTS"
fi

stop_server

if [ -f "$EVSD_LOG" ]; then
  nwarn=$(grep -c '"level":"\(WARN\|ERROR\)"' "$EVSD_LOG" || true)
  if [ "$nwarn" -gt 0 ]; then
    {
      echo "evsd logged $nwarn warning(s)/error(s) (first 5):"
      grep '"level":"\(WARN\|ERROR\)"' "$EVSD_LOG" | head -5 \
        | jq -r '"  " + .level + " " + .fields.message + " " + (.fields | del(.message) | tostring)'
      echo
    } >> "$RESULTS"
  fi
fi

echo
cat "$RESULTS"
echo "logs and fio JSON: $WORKDIR"
