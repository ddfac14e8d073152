#!/usr/bin/env bash
# Train on one node: one rank per GPU, or CPU ranks on gloo when there is no GPU.
#
#   launch/torchrun.sh experiment=tiny moe.num_experts=8 train.out_dir=runs/tiny
#   NPROC=4 launch/torchrun.sh train.steps=1000
#
# Experts are sharded over every rank: tiny's 4 do not split over 8 GPUs; 8 split over 1, 2, 4, 8.
#
# Arguments are Hydra overrides, passed through unchanged. The config is validated once,
# here, before any rank starts (python -m xpar.config.check): a bad one is one line on
# stderr and exit status 2, and torchrun never runs.
# Environment:
#   NPROC       ranks (default: visible GPU count, or 2 without a GPU)
#   PYTHON      interpreter with xpar installed (default: python)
#   XPAR_ENTRY  what torchrun runs (default: "-m xpar.train"; a script path works too,
#               and is not config-checked: it may take other arguments)
#   TORCHRUN_ARGS extra torchrun flags, e.g. "--max-restarts=1"
set -euo pipefail

PY=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  # torch counts what CUDA_VISIBLE_DEVICES leaves visible; no CUDA build or no GPU gives 0
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "${NGPU:-0}" -gt 0 ]; then NPROC=$NGPU; else NPROC=2; fi
fi
# One BLAS thread per rank unless told otherwise: ranks already fill the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

read -r -a ENTRY <<< "${XPAR_ENTRY:--m xpar.train}"
read -r -a EXTRA <<< "${TORCHRUN_ARGS:-}"
# Under torchrun a config error is one message per rank in torchrun's ChildFailedError
# report, exit 1; checked here it is one line, exit 2 (set -e passes the status on).
if [ "${ENTRY[*]}" = "-m xpar.train" ]; then
  "$PY" -m xpar.config.check --world-size "$NPROC" -- "$@"
fi
# --standalone: a local rendezvous on a free port, so two runs on one node do not collide.
exec "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  "${EXTRA[@]}" "${ENTRY[@]}" "$@"
