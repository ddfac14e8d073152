"""`xpar plan [OVERRIDE ...] --gpus N [--nodes M] [--gpu-mem 80GB] [--dtype bf16|fp32]
[--micro-batch 1 2 4]`: memory per rank and all-to-all traffic of a config on a cluster
that is not here. Flags are checked first, then the config is composed and validated for
N ranks on GPUs (as the trainer would there), then the estimate is pure arithmetic."""

from __future__ import annotations

import argparse
import re
import sys

from xpar.errors import XparConfigError

_UNITS = {"": 10**9, "gb": 10**9, "gib": 2**30, "tb": 10**12, "tib": 2**40, "mb": 10**6}


def parse_mem(text: str) -> int:
    """'80GB', '80', '141 GiB' -> bytes (a bare number is GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise XparConfigError(
            f"--gpu-mem={text!r} is invalid: give one GPU's memory as a number and a unit, "
            "e.g. --gpu-mem 80GB (or 80GiB; a bare number is GB)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="xpar plan",
        description="Memory per rank (params, grads, optimizer per ZeRO stage, activations "
        "per micro-batch with and without recompute) and all-to-all bytes of a config on a "
        "cluster, and whether it fits.",
    )
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides")
    ap.add_argument("--gpus", type=str, required=True, metavar="N", help="ranks (GPUs) in all")
    ap.add_argument("--nodes", type=str, default="1", metavar="M", help="nodes (default 1)")
    ap.add_argument("--gpu-mem", default="80GB", metavar="MEM", help="per GPU (default 80GB)")
    ap.add_argument("--dtype", default=None, help="bf16 or fp32 (default: parallel.precision)")
    ap.add_argument(
        "--micro-batch", nargs="+", default=None, metavar="B",
        help="sequences per rank per micro step to plan (the first sets the config's)",
    )  # fmt: skip
    return ap


def _positive_int(flag: str, text: str, what: str) -> int:
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise XparConfigError(f"{flag}={text!r} is invalid: use {what}, an integer >= 1")
    return n


def plan_from_args(args: argparse.Namespace):
    from xpar.plan.estimate import Cluster

    gpus = _positive_int("--gpus", args.gpus, "the number of GPUs")
    nodes = _positive_int("--nodes", args.nodes, "the number of nodes")
    cluster = Cluster(gpus=gpus, nodes=nodes, gpu_mem=parse_mem(args.gpu_mem))
    if args.dtype is not None and args.dtype not in ("bf16", "fp32"):
        raise XparConfigError(f"--dtype={args.dtype!r} is invalid: use bf16 or fp32")
    mbs = [_positive_int("--micro-batch", m, "sequences per rank") for m in args.micro_batch or []]
    overrides = list(args.overrides)
    if args.dtype:
        overrides.append(f"parallel.precision={args.dtype}")
    if mbs:
        overrides.append(f"train.micro_batch_size={mbs[0]}")
    cfg = compose_for_plan(overrides, gpus)
    from xpar.plan.estimate import estimate

    return estimate(cfg, cluster, mbs), cfg


def compose_for_plan(overrides: list[str], world_size: int):
    """The validated config for world_size ranks on GPUs; train.plan_only is lifted (the
    planner is what such configs are for)."""
    import warnings

    from xpar.config.store import XparConfigWarning, compose_dictconfig, load_and_validate

    dcfg = compose_dictconfig(overrides)
    dcfg.train.plan_only = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", XparConfigWarning)
        return load_and_validate(dcfg, world_size, rank=0, cuda_available=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        plan, _ = plan_from_args(args)
    except XparConfigError as e:
        print(f"xpar plan: error: {e}", file=sys.stderr)
        return 2
    from xpar.plan.report import render

    print(render(plan, " ".join(args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
