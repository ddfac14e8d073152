"""`xpar <command> [args]`: one console script for a model's whole life.

  train     compose a config and train (same as xpar-train / python -m xpar.train)
  generate  sample text from a checkpoint (xpar.infer.generate)
  eval      loss, perplexity and expert load of a checkpoint on local files (xpar.infer.evaluate)
  export    write a checkpoint as a Hugging Face model directory (xpar.interop.export)
  import    read a Hugging Face Mixtral / Qwen-MoE directory into an xpar checkpoint
            (xpar.interop.hf_import)
  bench     run one of the benchmarks (xpar.bench; `xpar bench --help` lists them)
  plan      memory per rank and all-to-all bytes of a config on a cluster (xpar.plan)

Each command's module is imported only when it runs, so `xpar generate` pays for neither
Hydra nor DeepSpeed.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv) -> int | None, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("xpar.train.cli", "compose a config and train (Hydra overrides follow)"),
    "generate": ("xpar.infer.generate", "sample text from a checkpoint"),
    "eval": ("xpar.infer.evaluate", "loss, perplexity and expert load on local files"),
    "export": ("xpar.interop.export", "write a checkpoint as a Hugging Face model"),
    "import": ("xpar.interop.hf_import", "read a Hugging Face MoE model into a checkpoint"),
    "bench": (
        "xpar.bench.__main__",
        "run a benchmark (moe under torchrun, attention, quality, startup)",
    ),
    "plan": ("xpar.plan.cli", "memory per rank and all-to-all bytes on a cluster"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: xpar <command> [args]   (xpar <command> --help for its own)\n\n" + "\n".join(
        lines
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"xpar: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr
        )
        sys.exit(2)
    if name != "train":  # the trainer quiets them itself (train.verbose)
        from xpar.train.sinks.quiet import quiet_third_party

        # before DeepSpeed's import-time "Setting accelerator" warning (a rank file's read)
        quiet_third_party(verbose=False)
    module = importlib.import_module(COMMANDS[name][0])
    if name == "train":
        # Hydra reads sys.argv itself: hand it the overrides as if called as xpar-train.
        sys.argv = [f"{sys.argv[0]} train", *rest]
        module.main()
        return
    code = module.main(rest)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
