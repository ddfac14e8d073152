#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs torch first
# (pinned by launch/constraints.txt), then xpar with its dev extra, then runs
#   test   the test suite (what .ci/run calls)
#   train  the default expert-parallel training run on 2 CPU ranks
#   bench  the MoE layer benchmark on 2 CPU ranks
#   run    any command inside the venv, e.g. `bash launch/dev.sh run torchrun ...`
#   status whether the venv is current (exit 0) or what makes it stale (exit 1); installs nothing
# Extra arguments go to pytest / the trainer / the benchmark / the command.
#
# Installing takes seconds even when nothing changed, so it runs only when the venv is
# missing or stale: its stamp (.venv/.xpar-dev-stamp) holds a hash of pyproject.toml,
# launch/constraints.txt and the venv's Python version, and torch and this checkout's
# xpar must be importable. XPAR_REINSTALL=1 installs anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${XPAR_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.xpar-dev-stamp"
cmd=${1:-test}
shift || true
if [ ! -x "$VENV/bin/python" ] && [ "$cmd" != status ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

wanted_stamp() {
  { cat pyproject.toml launch/constraints.txt; "$VENV/bin/python" -c 'import sys; print(sys.version)'; } \
    | sha256sum | cut -d' ' -f1
}

# Why the venv needs installing; empty when it is current.
stale_reason() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "no venv"
  elif [ ! -f "$STAMP" ]; then
    echo "no stamp: never installed by dev.sh"
  elif [ "$(cat "$STAMP")" != "$(wanted_stamp)" ]; then
    echo "pyproject.toml, launch/constraints.txt or the Python version changed"
  # torch and this checkout's xpar are importable (found, not imported: that takes seconds);
  # -I: the xpar the venv itself finds, not the one in the working directory
  elif ! XPAR_ROOT="$ROOT" "$VENV/bin/python" -I -c '
import os, sys
from importlib.util import find_spec
xpar = find_spec("xpar")
want = os.path.join(os.path.realpath(os.environ["XPAR_ROOT"]), "xpar", "__init__.py")
sys.exit(find_spec("torch") is None or xpar is None or os.path.realpath(xpar.origin) != want)
' >/dev/null 2>&1; then
    echo "torch or this checkout's xpar is not importable"
  fi
}

reason=$(stale_reason)
if [ "$cmd" = status ]; then
  echo "$VENV: ${reason:-current}"
  [ -z "$reason" ]
  exit
fi
if [ "${XPAR_REINSTALL:-0}" = 1 ] || [ -n "$reason" ]; then
  echo "launch/dev.sh: installing into $VENV (${reason:-XPAR_REINSTALL=1})" >&2
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    $PIP install -c launch/constraints.txt torch==2.13.0
  fi
  # dev: test tools and linters; slurm, hf, search: so their tests run rather than skip.
  $PIP install -c launch/constraints.txt -e ".[dev,slurm,hf,search]"
  wanted_stamp > "$STAMP"
fi
# Console scripts of the venv (hadolint, shellcheck, torchrun) without activating it.
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# pytest, where "no tests collected" (exit 5) fails on purpose rather than passing quietly.
run_pytest() {
  local rc=0
  "$VENV/bin/python" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests ($*): failing on purpose" >&2
    return 1
  fi
  return "$rc"
}

case "$cmd" in
  test)
    # With no arguments: the default tests, then the slow ones (real multi-rank runs and
    # fault injection), each stage timed; with arguments, pytest with those arguments.
    if [ "$#" -gt 0 ]; then
      rc=0
      run_pytest "$@" || rc=$?
      exit "$rc"
    fi
    t0=$SECONDS
    rc_default=0
    run_pytest -m "not slow" || rc_default=$?
    t1=$SECONDS
    rc_slow=0
    run_pytest -m slow || rc_slow=$?
    echo "launch/dev.sh test: default tests $((t1 - t0))s (exit $rc_default)," \
      "slow tests $((SECONDS - t1))s (exit $rc_slow)" >&2
    if [ "$rc_default" -ne 0 ] || [ "$rc_slow" -ne 0 ]; then
      exit 1
    fi
    exit 0
    ;;
  train)
    # One line and exit 2 (a bad config) or 4 (nothing to do) before torchrun starts a rank.
    "$VENV/bin/python" -m xpar.config.check --world-size 2 -- "$@"
    exec "$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m xpar.train "$@"
    ;;
  bench)
    # moe (the default, also when the first argument is an option such as --rows 1) runs on
    # 2 ranks; quality and startup start their own processes; --help needs no ranks.
    case "${1:-moe}" in
      -h | --help) exec "$VENV/bin/python" -m xpar.bench "$@" ;;
      moe | -*) exec "$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m xpar.bench "$@" ;;
      *) exec "$VENV/bin/python" -m xpar.bench "$@" ;;
    esac
    ;;
  run)
    if [ "$#" -eq 0 ]; then
      echo "usage: launch/dev.sh run COMMAND [args...]" >&2
      exit 2
    fi
    export VIRTUAL_ENV="$VENV"
    exec "$@"
    ;;
  *)
    echo "usage: launch/dev.sh {test|train|bench|run|status} [args...]" >&2
    exit 2
    ;;
esac
