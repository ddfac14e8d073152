"""`python -m xpar.search [overrides]`: the search for efficient configurations.

A Hydra multirun (`--multirun` and `experiment=search` are added; another experiment=...
replaces the latter) with the Optuna sweeper, whose task function is
xpar.search.trial.run_trial rather than the trainer's main: a trial checks the FLOPs
budget before it trains and returns (val loss, tokens/s) to the sweeper. Everything else
is an ordinary override, e.g.

    python -m xpar.search hydra.sweeper.n_trials=8 hydra.sweep.dir=outputs/search2
    python -m xpar.search hydra.callbacks.search.flops_budget=3e6 train.steps=100

Rerunning the same command resumes the study (xpar.search.study). At the end the Pareto
front is printed and written to <hydra.sweep.dir>/pareto.md and pareto.png.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from xpar.config.store import CONFIG_DIR, register_configs

EXPERIMENT = "experiment=search"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _search(dcfg: DictConfig) -> tuple[float, float]:
    from xpar.redact import redact_hydra_output
    from xpar.search.trial import run_trial
    from xpar.train.sinks.quiet import quiet_third_party

    quiet_third_party(bool(OmegaConf.select(dcfg, "train.verbose", default=False)))
    redact_hydra_output()  # Hydra wrote the job's .hydra/ from the raw overrides
    return run_trial(dcfg)


def hydra_args(args: list[str]) -> list[str]:
    """The arguments Hydra gets: multirun, experiment=search unless one is given, the rest."""
    out = [a for a in args if a not in ("-m", "--multirun")]
    if not any(a.split("=", 1)[0].lstrip("+~") == "experiment" for a in out):
        out.insert(0, EXPERIMENT)
    return ["--multirun", *out]


def _quiet_study_logs() -> None:
    """The sweeper names each trial and we say what the study holds: Optuna's own study lines
    and the "setup plugin" lines alembic logs as Optuna's SQLite storage imports it are noise."""
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    from xpar.search import callback, study
    from xpar.train.sinks.warning_log import WarningLog

    WarningLog(rank=0).install()  # xpar's warnings one line each, as in the trainer
    _quiet_study_logs()
    register_configs()
    study.register_resolver()
    callback.mark_entry()
    sys.argv = [sys.argv[0], *hydra_args(sys.argv[1:])]
    _search()


if __name__ == "__main__":
    main()
