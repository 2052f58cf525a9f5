# Helpers shared by the benchmark scripts (sourced, not run).

# SIZE with an optional K/M/G suffix, in bytes.
to_bytes() {
  local s=$1
  case "$s" in
    *[kK]) echo $(( ${s%?} * 1024 )) ;;
    *[mM]) echo $(( ${s%?} * 1024 * 1024 )) ;;
    *[gG]) echo $(( ${s%?} * 1024 * 1024 * 1024 )) ;;
    *) echo "$s" ;;
  esac
}

# A TCP port free on 127.0.0.1 now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $(( 20000 + RANDOM % 20000 ))
}

# utime+stime of a process (all threads), in clock ticks.
cpu_ticks() {
  local stat rest
  stat=$(cat "/proc/$1/stat")
  rest=${stat##*) }
  # fields after "(comm) ": state=1 ... utime=12 stime=13
  echo "$rest" | awk '{print $12 + $13}'
}

# CPU seconds (user + system) of all finished children of this shell so far (bash `times`,
# run in this shell: in a $(...) subshell it would count that subshell's children only).
# Needs WORKDIR.
children_cpu() {  # sets CHILDREN_CPU
  times > "$WORKDIR/times.out"
  CHILDREN_CPU=$(awk 'NR == 2 {
    t = 0
    for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
    printf "%.3f", t }' "$WORKDIR/times.out")
}
