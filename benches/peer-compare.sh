#!/usr/bin/env bash
# peer-compare.sh: evsd against nbdkit and qemu-nbd under identical fio workloads.
#
# Usage:
#   benches/peer-compare.sh                # full run (~10 min at RUNTIME=10)
#   RUNTIME=3 SERVERS="evsd nbdkit" TRANSPORTS=unix benches/peer-compare.sh
#
# What it does:
#   * Builds evsd in release mode (`cargo build --release -p evsd`) unless
#     EVSD_BIN points at a binary.
#   * Makes a SIZE (default 1G) file of random data in WORKDIR. nbdkit
#     (`nbdkit file FILE`) and qemu-nbd (`qemu-nbd -f raw --aio=io_uring
#     --cache=writeback --discard=unmap --shared=8 -t`) serve that file. evsd keeps volumes in
#     its own format, so it gets a volume of the same size
#     (`--no-default-volume --create-volume bench:SIZE`) that is filled with the
#     same random data through NBD (nbdcopy) first, so that reads hit real data.
#   * Per transport (Unix socket, TCP on 127.0.0.1) the servers are started
#     together and stay idle but for the one measured; each workload runs on
#     them one right after the other (the first in turn rotating), so the runs
#     a ratio compares are seconds apart. fio's nbd engine (one libnbd
#     connection per fio job) drives them with these workloads:
#         randread-4k   rw=randread  bs=4k iodepth=32
#         randwrite-4k  rw=randwrite bs=4k iodepth=32
#         read-1m       rw=read      bs=1m iodepth=8
#         write-1m      rw=write     bs=1m iodepth=8
#     and, when named in WORKLOADS (not by default):
#         randwrite-4k-imported  randwrite-4k right after the image was written through
#                       the server with `nbdcopy --request-size=2M` (as `qemu-img convert`
#                       writes), the cache left as that fill left it
#     each with numjobs 1 and 4 (= connections). Jobs split the volume into
#     disjoint regions (size = offset_increment = SIZE/numjobs), time_based.
#   * Per run: IOPS and MiB/s (fio --output-format=json, group_reporting),
#     the server process's CPU seconds during the run (utime+stime delta from
#     /proc/PID/stat, all threads, divided by CLK_TCK), and IOPS per server
#     CPU-second; and the client's CPU seconds (fio and its job processes, from
#     bash `times`), which tell a row bound by the client (fio near one core per
#     job) from one bound by the server. Prints a side-by-side table and, per
#     workload, evsd's ratio to the best peer (for IOPS and for IOPS per
#     CPU-second).
#   * With REPEAT=N the whole matrix runs N times; the table shows medians
#     over the runs and evsd's IOPS ratio to the best peer within each round.
#     Single runs on a small shared VM swing by tens of percent; a ratio within
#     one round compares the servers under the same conditions.
#
# Environment:
#   RUNTIME=10            seconds per fio run
#   REPEAT=1              rounds of the whole matrix (medians are reported)
#   RAMP=0                fio ramp_time in seconds (not measured; CPU is scaled)
#   SIZE=1G               volume size (K/M/G suffix)
#   SERVERS="evsd nbdkit qemu-nbd"
#   TRANSPORTS="unix tcp"
#   JOBS="1 4"            numjobs values
#   WORKLOADS="randread-4k randwrite-4k read-1m write-1m"
#   WORKDIR=<new dir under /var/tmp>   kept afterwards; results.csv goes there
#   EVSD_BIN=<path>       skip the cargo build and use this binary
#   EVSD_ARGS="..."       extra evsd arguments (e.g. "--io-engine threads")
#
# Requires: fio (with the nbd engine), nbdkit, qemu-nbd, nbdcopy, nbdinfo, jq,
# awk, getconf. `bash scripts/install-test-deps.sh` installs all of them.
# The machine has 2 cores: client (fio) and server compete for them, so
# compare the servers with each other, not with numbers from other machines.
set -euo pipefail

RUNTIME=${RUNTIME:-10}
REPEAT=${REPEAT:-1}
RAMP=${RAMP:-0}
SIZE=${SIZE:-1G}
SERVERS=${SERVERS:-"evsd nbdkit qemu-nbd"}
TRANSPORTS=${TRANSPORTS:-"unix tcp"}
JOBS=${JOBS:-"1 4"}
WORKLOADS=${WORKLOADS:-"randread-4k randwrite-4k read-1m write-1m"}
EVSD_ARGS=${EVSD_ARGS:-}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$REPO/benches/lib.sh"

die() { echo "peer-compare: $*" >&2; exit 1; }
log() { echo "peer-compare: $*" >&2; }

for t in fio nbdkit qemu-nbd nbdcopy nbdinfo jq awk getconf; do
  command -v "$t" >/dev/null 2>&1 || die "missing tool '$t' (run: bash scripts/install-test-deps.sh)"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine"

SIZE_BYTES=$(to_bytes "$SIZE")
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- evsd binary
if [ -z "${EVSD_BIN:-}" ]; then
  log "building evsd (release)"
  (cd "$REPO" && cargo build --release -p evsd >&2)
  tdir=${CARGO_TARGET_DIR:-$REPO/target}
  EVSD_BIN=$tdir/release/evsd
fi
[ -x "$EVSD_BIN" ] || die "evsd binary $EVSD_BIN not found"

# ---------------------------------------------------------------- work dir
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/evsd-peer-compare.XXXXXX)}
mkdir -p "$WORKDIR"
IMG=$WORKDIR/peer.img
RESULTS=$WORKDIR/results.csv
log "work dir $WORKDIR"
# evsd's default (--tcp-congestion auto) serves loopback clients with cubic or reno when the
# system's algorithm is BBR; nbdkit and qemu-nbd keep the system's. Printed so a run says which
# held; `sysctl net.ipv4.tcp_congestion_control=cubic` gives every server the same.
log "system TCP congestion control: $(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null || echo unknown)"

if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -ne "$SIZE_BYTES" ]; then
  log "writing $SIZE of random data to $IMG"
  head -c "$SIZE_BYTES" /dev/urandom > "$IMG.tmp"
  mv "$IMG.tmp" "$IMG"
fi

SERVER_PID=""
# The servers of the transport being measured, all running at once: server -> pid, uri.
declare -A PIDS=() URIS=() LOGS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}" $SERVER_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_uri() {
  local uri=$1
  for _ in $(seq 1 200); do
    if nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited early (log: $LOG)"
    sleep 0.1
  done
  die "server did not come up at $uri (log: $LOG)"
}

# Sets SERVER_PID, URI and LOG.
start_server() {
  local server=$1 transport=$2 sock=$WORKDIR/$1.sock port
  rm -f "$sock"
  LOG=$WORKDIR/$server-$transport-r$round.log
  : > "$LOG"
  case "$server" in
    evsd)
      local ready=$WORKDIR/evsd.ready listen
      rm -f "$ready"
      local args=(--data-dir "$WORKDIR/evsd-data" --no-default-volume
                  --create-volume "bench:$SIZE_BYTES" --ready-file "$ready"
                  --listen 127.0.0.1:0 --metrics-listen off)
      if [ "$transport" = unix ]; then args+=(--unix "$sock"); fi
      # shellcheck disable=SC2086
      "$EVSD_BIN" "${args[@]}" $EVSD_ARGS >>"$LOG" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 1 200); do
        [ -s "$ready" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "evsd exited early: $(tail -20 "$LOG")"
        sleep 0.1
      done
      [ -s "$ready" ] || die "evsd wrote no ready file"
      if [ "$transport" = unix ]; then
        URI="nbd+unix:///bench?socket=$sock"
      else
        listen=$(jq -r .tcp "$ready")
        URI="nbd://$listen/bench"
      fi
      ;;
    nbdkit)
      if [ "$transport" = unix ]; then
        nbdkit --foreground --exit-with-parent -U "$sock" file "$IMG" >>"$LOG" 2>&1 &
        URI="nbd+unix:///bench?socket=$sock"
      else
        port=$(free_port)
        nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$port" file "$IMG" >>"$LOG" 2>&1 &
        URI="nbd://127.0.0.1:$port/bench"
      fi
      SERVER_PID=$!
      ;;
    qemu-nbd)
      local q=(-f raw --aio=io_uring --cache=writeback --discard=unmap --shared=8 -t -x bench)
      if [ "$transport" = unix ]; then
        qemu-nbd "${q[@]}" -k "$sock" "$IMG" >>"$LOG" 2>&1 &
        URI="nbd+unix:///bench?socket=$sock"
      else
        port=$(free_port)
        qemu-nbd "${q[@]}" -b 127.0.0.1 -p "$port" "$IMG" >>"$LOG" 2>&1 &
        URI="nbd://127.0.0.1:$port/bench"
      fi
      SERVER_PID=$!
      ;;
    *) die "unknown server $server" ;;
  esac
  wait_uri "$URI"
}

stop_servers() {
  local server
  for server in "${!PIDS[@]}"; do
    kill "${PIDS[$server]}" 2>/dev/null || true
    wait "${PIDS[$server]}" 2>/dev/null || true
  done
  PIDS=() URIS=() LOGS=()
}

# The servers in turn for the `index`th measurement: rotated, so that none always goes first.
servers_in_turn() {
  local index=$1 n i
  local -a list
  read -r -a list <<<"$SERVERS"
  n=${#list[@]}
  for ((i = 0; i < n; i++)); do
    printf '%s ' "${list[$(( (index + i) % n ))]}"
  done
}

workload_params() {
  case "$1" in
    randread-4k)  echo "randread 4k 32" ;;
    randwrite-4k) echo "randwrite 4k 32" ;;
    read-1m)      echo "read 1m 8" ;;
    write-1m)     echo "write 1m 8" ;;
    randwrite-4k-imported) echo "randwrite 4k 32" ;;
    *) die "unknown workload $1" ;;
  esac
}

# Fill evsd's volume once with the same random data the peers serve.
fill_evsd() {
  local marker=$WORKDIR/evsd-filled
  [ -f "$marker" ] && [ -d "$WORKDIR/evsd-data" ] && return 0
  log "filling evsd volume with the random image (nbdcopy)"
  nbdcopy -C 4 --flush "$IMG" "$URI"
  touch "$marker"
}

echo "server,transport,workload,jobs,iops,mib_s,server_cpu_s,iops_per_cpu_s,round,client_cpu_s" > "$RESULTS"

# Every run starts from the same state: earlier writes flushed to disk (so their writeback does
# not land in the next server's CPU and I/O time) and the backing file's cached pages dropped.
# Read workloads then read the file back into the page cache (this VM reclaims idle cache, which
# would otherwise turn some servers' reads into disk reads); write workloads start from an empty
# cache. Dropping matters for writes: pages cached by the way a file was filled (nbdcopy's 256 KiB
# writes for evsd's volume, `head`'s for the peers' image) or read ahead stay in large folios,
# and the kernel's buffered 4 KiB write walks every block of the folio it lands in
# (ext4_block_write_begin: 43% of the CPU and 2.3x fewer IOPS at 256 KiB folios), so the figures
# would measure how each file happened to be cached rather than the server.
settle() {
  local backing=$IMG
  if [ "$1" = evsd ]; then
    # The volume's head layer: its data file is named in the manifest.
    local dir=$WORKDIR/evsd-data/volumes/bench
    backing=$dir/$(jq -r .head "$dir/volume.json").data
  fi
  sync
  dd if="$backing" iflag=nocache count=0 status=none
  case "$2" in
    randread-4k | read-1m) cat "$backing" > /dev/null ;;
    # As after `qemu-img convert` into the volume: the image written through the server in
    # 2 MiB requests, its pages left in the cache as that left them.
    # The source is a copy: read ahead, the served file itself would get its large folios
    # from the reads instead.
    randwrite-4k-imported)
      [ -f "$WORKDIR/import.img" ] || cp "$IMG" "$WORKDIR/import.img"
      nbdcopy --request-size=2097152 "$WORKDIR/import.img" "$URI" && sync ;;
  esac
}

# Per transport, every server runs at once (idle but for the one measured), and each
# workload runs on the servers one right after the other: on a shared VM whose speed drifts
# over minutes, the runs a ratio compares are seconds apart, not the length of a matrix.
for round in $(seq 1 "$REPEAT"); do
  # Each row's first server moves on by one from round to round, whatever the row count.
  turn=$((round - 1))
  for transport in $TRANSPORTS; do
    for server in $SERVERS; do
      log "starting $server over $transport"
      start_server "$server" "$transport"
      PIDS[$server]=$SERVER_PID URIS[$server]=$URI LOGS[$server]=$LOG
      SERVER_PID=""
      [ "$server" = evsd ] && fill_evsd
    done
    for wl in $WORKLOADS; do
      read -r rw bs depth <<<"$(workload_params "$wl")"
      for jobs in $JOBS; do
        region=$(( SIZE_BYTES / jobs ))
        region=$(( region / 1048576 * 1048576 ))
        for server in $(servers_in_turn "$turn"); do
          URI=${URIS[$server]}
          pid=${PIDS[$server]}
          kill -0 "$pid" 2>/dev/null || die "$server exited (log: ${LOGS[$server]})"
          out=$WORKDIR/fio-$server-$transport-$wl-$jobs-r$round.json
          settle "$server" "$wl"
          c0=$(cpu_ticks "$pid")
          children_cpu; f0=$CHILDREN_CPU
          fio --name="$wl" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" \
              --iodepth="$depth" --numjobs="$jobs" --size="$region" \
              --offset_increment="$region" --time_based=1 --runtime="$RUNTIME" \
              --ramp_time="$RAMP" --group_reporting=1 --output-format=json \
              --output="$out" >/dev/null 2>"$out.err" \
            || die "fio failed for $server/$transport/$wl/$jobs: $(cat "$out.err")"
          children_cpu; f1=$CHILDREN_CPU
          c1=$(cpu_ticks "$pid")
          jq -e '.jobs[0].error == 0' "$out" >/dev/null \
            || die "fio reported an error for $server/$transport/$wl/$jobs (see $out)"
          iops=$(jq '.jobs[0].read.iops + .jobs[0].write.iops' "$out")
          kib=$(jq '.jobs[0].read.bw + .jobs[0].write.bw' "$out")
          # CPU covers the ramp too: scale to the measured part.
          row=$(awk -v s="$server" -v t="$transport" -v w="$wl" -v j="$jobs" \
                    -v iops="$iops" -v kib="$kib" -v c0="$c0" -v c1="$c1" \
                    -v tck="$CLK_TCK" -v rt="$RUNTIME" -v ramp="$RAMP" -v r="$round" \
                    -v f0="$f0" -v f1="$f1" 'BEGIN {
                cpu = (c1 - c0) / tck * rt / (rt + ramp);
                per = (cpu > 0) ? iops / (cpu / rt) : 0;
                client = (f1 - f0) * rt / (rt + ramp);
                printf "%s,%s,%s,%d,%.0f,%.1f,%.2f,%.0f,%d,%.2f", s, t, w, j, iops, kib / 1024, cpu, per, r, client
              }')
          echo "$row" >> "$RESULTS"
          log "$row"
        done
        turn=$((turn + 1))
      done
    done
    stop_servers
  done
done

# ---------------------------------------------------------------- report
# Each figure is the median over the rounds (for an even count, the lower middle run).
awk -F, -v servers="$SERVERS" -v rounds="$REPEAT" -v runtime="$RUNTIME" '
function median(key, s, field,    n, i, j, t, a) {
  n = count[key, s]
  for (i = 1; i <= n; i++) a[i] = val[key, s, field, i]
  for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
  return a[int((n + 1) / 2)]
}
# One line per row: the median of field for every server.
function per_server(title, field, fmt,    k, i, key, s) {
  printf "%s", title
  for (k = 1; k <= nk; k++) {
    key = keys[k]; printf "%-26s", key
    for (i = 1; i <= ns; i++) {
      s = sv[i]
      if (count[key, s] > 0) printf " | %-10s " fmt, s, median(key, s, field); else printf " | %-10s %10s", s, "-"
    }
    printf "\n"
  }
}
NR == 1 { next }
{
  key = $2 " " $3 " j" $4
  if (!(key in seen)) { seen[key] = 1; keys[++nk] = key }
  n = ++count[key, $1]
  val[key, $1, "iops", n] = $5; val[key, $1, "mib", n] = $6
  val[key, $1, "cpu", n] = $7; val[key, $1, "per", n] = $8; val[key, $1, "client", n] = $10
  run[key, $1, $9] = $5
}
END {
  ns = split(servers, sv, " ")
  printf "\n%-26s", "IOPS (MiB/s) [srv CPU s]"
  for (i = 1; i <= ns; i++) printf " | %-30s", sv[i]
  printf " | %-12s | %-19s", "evsd/best", "evsd/best per CPU-s"
  if (rounds > 1) printf " | evsd/best by round"
  printf "\n"
  line = sprintf("%-26s", ""); gsub(/ /, "-", line); printf "%s", line
  for (i = 1; i <= ns; i++) printf "-+-------------------------------"
  printf "-+--------------+--------------------"
  if (rounds > 1) printf "+-------------------"
  printf "\n"
  for (k = 1; k <= nk; k++) {
    key = keys[k]
    printf "%-26s", key
    best = 0; bestper = 0
    for (i = 1; i <= ns; i++) {
      s = sv[i]
      if (count[key, s] > 0) {
        iops[s] = median(key, s, "iops"); per[s] = median(key, s, "per")
        printf " | %9d (%7.1f) [%6.2f]   ", iops[s], median(key, s, "mib"), median(key, s, "cpu")
      } else {
        printf " | %-30s", "-"
      }
      if (s != "evsd" && count[key, s] > 0) {
        if (iops[s] > best) best = iops[s]
        if (per[s] > bestper) bestper = per[s]
      }
    }
    has = count[key, "evsd"] > 0
    r1 = (best > 0 && has) ? sprintf("%.2fx", iops["evsd"] / best) : "-"
    r2 = (bestper > 0 && has) ? sprintf("%.2fx", per["evsd"] / bestper) : "-"
    printf " | %-12s | %-19s", r1, r2
    if (rounds > 1) {
      # Within each round: evsd against the best peer of that round.
      printf " |"
      for (r = 1; r <= rounds; r++) {
        b = 0
        for (i = 1; i <= ns; i++)
          if (sv[i] != "evsd" && ((key, sv[i], r) in run) && run[key, sv[i], r] > b) b = run[key, sv[i], r]
        printf " %s", (b > 0 && ((key, "evsd", r) in run)) ? sprintf("%.2f", run[key, "evsd", r] / b) : "-"
      }
    }
    printf "\n"
  }
  per_server("\nIOPS per server CPU-second (medians):\n", "per", "%10d")
  # fio is the client: one process per job, each on one core at most. A row whose client
  # seconds come near RUNTIME x jobs (or the 2 cores x RUNTIME the machine has) is bound by
  # the client, whatever the server does.
  per_server(sprintf("\nClient (fio) CPU seconds, medians (runs of %d s, fio start-up included; one core per job at most):\n", runtime), "client", "%10.2f")
}' "$RESULTS"

echo
echo "raw results: $RESULTS (fio JSON per run in $WORKDIR)"
