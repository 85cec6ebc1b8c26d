# Sourced by the gpu_*.sh call scripts: `go SECONDS NAME COMMAND...` runs COMMAND with its own
# time limit (SIGINT, so minift bench saves what finished), logging to $out/NAME.log; a failure
# is reported on stderr and the script goes on.
go() {
  local s=$1 name=$2; shift 2
  timeout -s INT "$s" "$@" > "$out/$name.log" 2>&1 || echo "FAILED ($?): $name" >&2
}
