# What benchmarks/gpu.sh and benchmarks/distributed_bench.sh share; each sources this file.
#
# parse_stage_args "$@": --out DIR, --dry-run, -h/--help (the script's header comment) and the stage
# names (into $out, $dry, $stages); any other option with its value goes to the script's own
# `script_option NAME VALUE`, which returns 1 for an option it does not know.
parse_stage_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --out) out=$2; shift 2 ;;
      --dry-run) dry=1; shift ;;
      -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      -*) script_option "$1" "${2-}" || { echo "unknown option $1 (see --help)" >&2; exit 2; }; shift 2 ;;
      *) stages+=("$1"); shift ;;
    esac
  done
}

# out_dir DEFAULT: $out (DEFAULT when none was given) created and made absolute
out_dir() {
  out=${out:-$1}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
}

# go SECONDS NAME COMMAND...: COMMAND under its own time limit, output to $out/NAME.log
go() {
  local s=$1 name=$2; shift 2
  if [ "$dry" = 1 ]; then echo "[$s s] $*"; return 0; fi
  echo "== $name ($(date +%H:%M:%S), limit $s s)" >&2
  timeout -s INT "$s" "$@" > "$out/$name.log" 2>&1 || echo "FAILED ($?): $name, see $out/$name.log" >&2
}
