"""`python -m xpar.bench [NAME] [options]`: run one benchmark; NAME --help lists its options.

Each benchmark is a module with main(argv) (BENCHMARKS below). Without a NAME, or when the
first argument is an option (`--rows 1`), the benchmark is moe, so a launcher can pass
its arguments on unchanged.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence

DEFAULT = "moe"
# name -> (module with main(argv), what launches it, what it measures)
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "moe": (
        "xpar.bench.moe",
        "under torchrun",
        "MoE layer fwd+bwd: xpar vs DeepSpeed's MoE vs the bound",
    ),
    "step": (
        "xpar.bench.step",
        "under torchrun",
        "the whole training step: xpar vs DeepSpeed's MoE in the same decoder",
    ),
    "dispatch": (
        "xpar.bench.dispatch",
        "under torchrun",
        "EP exchange: counts vs padded, comm_chunks 1/2/4 (the auto rules' figures)",
    ),
    "expert_gemm": (
        "xpar.bench.expert_gemm",
        "plain python",
        "expert GEMM paths: loop vs grouped vs padded (moe.expert_gemm=auto's figures)",
    ),
    "quality": (
        "xpar.bench.quality",
        "plain python",
        "dense vs MoE at equal active params: val loss",
    ),
    "attention": (
        "xpar.bench.attention",
        "plain python",
        "attention variants vs dense: fwd+bwd time and memory vs L",
    ),
    "startup": (
        "xpar.bench.startup",
        "plain python",
        "launch to the first training step, by phase",
    ),
}
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    listed = "\n".join(
        f"  {name:<12} {what} ({how})" for name, (_, how, what) in BENCHMARKS.items()
    )
    ap = argparse.ArgumentParser(
        prog="python -m xpar.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one of xpar's benchmarks.",
        epilog=f"benchmarks:\n{listed}\n\n"
        f"`python -m xpar.bench NAME --help` lists NAME's options. Without NAME, or when the "
        f"first\nargument is an option, NAME is {DEFAULT}. Examples:\n"
        "  torchrun --standalone --nproc-per-node 2 -m xpar.bench moe --rows 0\n"
        "  python -m xpar.bench quality --steps 100",
    )
    ap.add_argument("name", nargs="?", default=DEFAULT, metavar="NAME", help="the benchmark")
    ap.add_argument("args", nargs="*", metavar="ARG", help="options for that benchmark")
    return ap


def split(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(benchmark name, its arguments): the name is the first argument unless that is an option."""
    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        return DEFAULT, argv
    return argv[0], argv[1:]


def main(argv: Sequence[str] | None = None) -> None:
    from xpar.train.launcher import die_with_launcher

    die_with_launcher()  # a killed torchrun takes its benchmark ranks with it, as the trainer's
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        if os.environ.get("RANK", "0") == "0":  # under torchrun: one help, not one per rank
            _parser().print_help()
        raise SystemExit(0)
    name, args = split(argv)
    if name not in BENCHMARKS:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        _fail(
            f"unknown benchmark {name!r}: {hint}choose one of {', '.join(BENCHMARKS)} "
            "(python -m xpar.bench --help describes them)"
        )
    module = BENCHMARKS[name][0]
    try:
        run = importlib.import_module(module).main
    except ModuleNotFoundError as e:
        if e.name != module:
            raise  # a missing dependency of the benchmark: its own message says which
        _fail(
            f"benchmark {name!r} is not in this xpar ({module} is missing); "
            "update xpar or choose another benchmark"
        )
    run(args)


def _fail(msg: str) -> None:
    print(f"xpar.bench: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


if __name__ == "__main__":
    main()
