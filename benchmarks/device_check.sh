#!/usr/bin/env bash
# A time-boxed device check: backend, executor throughput, the CIFAR-100 setting (JSON).
#
#   bash benchmarks/device_check.sh [OUT.json] [--tiny | --full] [--budget S]
#
# Writes OUT.json, else $OUT/device_check.json when the environment variable OUT is set (the
# GPU tool collects the files under $OUT), else ./device_check.json. Flags go to
# benchmarks/device_check.py (--tiny is its default on a CPU backend). A hard `timeout` keeps the
# whole run under 8 minutes (DEVICE_CHECK_TIMEOUT seconds, default 450, then 10 s to exit);
# the script rewrites the JSON after each entry, so a run cut short still leaves what it
# measured. The persistent compilation cache is off unless FEDJAX_BN_COMPILATION_CACHE is set.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

out=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --budget) args+=("$1" "$2"); shift 2 ;;
    -*) args+=("$1"); shift ;;
    *)
      if [[ -z "$out" ]]; then out="$1"; else args+=("$1"); fi
      shift
      ;;
  esac
done
if [[ -z "$out" ]]; then
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    out="$OUT/device_check.json"
  else
    out="device_check.json"
  fi
fi

# DEVICE_CHECK_PYTHON, else the active virtual environment's python, else the repository's
# .venv (where it has jax), else python3.
if [[ -n "${DEVICE_CHECK_PYTHON:-}" ]]; then
  py="$DEVICE_CHECK_PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  py="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import jax" 2>/dev/null; then
  py="$ROOT/.venv/bin/python"
else
  py="$(command -v python3 || command -v python)"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Honest compile times: no persistent compilation cache unless the caller asks for one.
export FEDJAX_BN_COMPILATION_CACHE="${FEDJAX_BN_COMPILATION_CACHE:-0}"

export DEVICE_CHECK_T0="${DEVICE_CHECK_T0:-$(date +%s.%N)}"  # the budget counts from here
limit="${DEVICE_CHECK_TIMEOUT:-450}"  # + 10 s to die: under 8 minutes in all
echo "device_check: $py, timeout ${limit}s, writing $out" >&2
timeout --kill-after=10 "$limit" "$py" "$ROOT/benchmarks/device_check.py" --out "$out" ${args[@]+"${args[@]}"}
rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "device_check: hit the ${limit}s timeout; $out holds what was measured" >&2
fi
[[ -f "$out" ]] && cat "$out"
exit $rc
