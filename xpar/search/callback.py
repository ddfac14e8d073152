"""The search around Hydra's Optuna sweep: resume before it, the Pareto report after it.

conf/experiment/search.yaml installs it as `hydra.callbacks.search`, which also carries the
search's own setting, the FLOPs budget, read by each trial (xpar.search.trial):

    hydra.callbacks.search.flops_budget=2e6    # training FLOPs per token; 0: no budget

on_multirun_start (before Hydra builds the sweeper from the same config): refuse an
attention choice no trial could train (xpar.search.space), open or resume the study
(xpar.search.study) and set the sweeper's n_trials to the trials still missing and its
sampler's seed past the trials already drawn. on_multirun_end: the Pareto front as a table
on the console and in <hydra.sweep.dir>/pareto.md, and the plot pareto.png beside it.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from xpar.errors import XparConfigError
from xpar.search import space, study

_ENTRY = {"search": False}  # set by xpar.search.cli: trials must be its task function


def mark_entry() -> None:
    _ENTRY["search"] = True


def _or_exit(step: Callable[[DictConfig], None], config: DictConfig) -> None:
    """Hydra turns a callback's exception into a warning and goes on; the search must stop:
    a config error is one line and exit 2 (as in the trainer), anything else its traceback."""
    from xpar.config.check import exit_config_error

    try:
        step(config)
    except XparConfigError as e:
        exit_config_error(e, rank=0)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


class SearchCallback(Callback):
    def __init__(self, flops_budget: float = 0.0, report: bool = True) -> None:
        if not flops_budget >= 0:
            raise XparConfigError(
                f"hydra.callbacks.search.flops_budget={flops_budget} is invalid; use training "
                "FLOPs per token >= 0 (0: no budget), e.g. 2e6"
            )
        self.flops_budget = float(flops_budget)
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(self._start, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.report:
            _or_exit(self._report, config)

    def _start(self, config: DictConfig) -> None:
        if not _ENTRY["search"]:
            raise XparConfigError(
                "experiment=search runs its trials through `python -m xpar.search "
                "[overrides]` (each trial checks the FLOPs budget and returns val loss and "
                "tokens/s to the sweeper); run that instead of xpar.train -m"
            )
        sweeper = config.hydra.sweeper
        space.check_space(sweeper.params or {})
        st, done, todo = study.start(sweeper)
        with read_write(config.hydra.sweeper):
            sweeper.n_trials = todo
            if sweeper.sampler.get("seed") is not None:
                sweeper.sampler.seed = int(sweeper.sampler.seed) + study.trial_number(0)
        budget = f"{self.flops_budget:.3g} FLOPs/token" if self.flops_budget else "none"
        print(
            f"search: study {st.study_name!r} in {sweeper.storage}: {done} complete trials "
            f"of {done + todo}, running {todo} (budget: {budget})",
            flush=True,
        )

    def _report(self, config: DictConfig) -> None:
        from xpar.search.pareto import write_report

        st = study.open_study(config.hydra.sweeper)
        text, md, png = write_report(st, Path(config.hydra.sweep.dir))
        print(f"{text}\nsearch: Pareto front in {md} and {png}", flush=True)
