"""python -m xpar.bench {moe,quality} [options] (moe under torchrun)."""

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    which = argv.pop(0) if argv else "moe"
    if which == "moe":
        from xpar.bench.moe import main as run
    elif which == "quality":
        from xpar.bench.quality import main as run
    else:
        raise SystemExit(f"unknown benchmark {which!r}: choose moe or quality")
    run(argv)


if __name__ == "__main__":
    main()
