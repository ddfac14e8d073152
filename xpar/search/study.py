"""The search's study on disk, and how a rerun resumes it.

The study lives in an SQLite file (hydra.sweeper.storage, by default
sqlite:///<hydra.sweep.dir>/search.db) under a fixed name (hydra.sweeper.study_name), so
rerunning the same command continues it:

- hydra.sweeper.n_trials is the study's total: a rerun runs only the trials still missing
  (complete trials count, including the ones not trained because they were over budget);
- a trial left running by an interrupted search is marked failed and does not count, so its
  place is taken by a new trial;
- trials are numbered by the study, and trial N trains in <hydra.sweep.dir>/trial_N: the
  sweeper numbers its jobs from 0 in every run, so `hydra.sweep.subdir` adds the number of
  trials the study held at the start (`${xpar.search_trial:${hydra.job.num}}`); the study's
  trials are asked one batch at a time in order, so job j of this run is trial offset + j;
- the sampler's seed is offset the same way: a resumed search does not repeat the random
  draws it started with.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RESOLVER = "xpar.search_trial"
_offset = 0  # trials the study held when this process's sweep started


def trial_number(job_num: int | str) -> int:
    """The study's number of this run's job `job_num`."""
    return _offset + int(job_num)


def register_resolver() -> None:
    OmegaConf.register_new_resolver(RESOLVER, trial_number, replace=True)


def _storage_dir(storage: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]).parent if storage.startswith(prefix) else None


def open_study(sweeper: DictConfig):
    """Create or load the sweeper's study; trials an interrupted run left running fail."""
    import optuna
    from optuna.trial import TrialState

    storage = str(sweeper.storage)
    folder = _storage_dir(storage)
    if folder is not None:  # SQLite creates the file, not its folder
        folder.mkdir(parents=True, exist_ok=True)
    direction = sweeper.direction
    directions = [direction] if isinstance(direction, str) else list(direction)
    study = optuna.create_study(
        study_name=str(sweeper.study_name),
        storage=storage,
        directions=[str(d) for d in directions],
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    return study


def set_trial_attrs(sweeper: DictConfig, number: int, attrs: dict) -> None:
    """Record facts about trial `number` (its cost, why it was not trained) in the study."""
    import optuna

    st = optuna.load_study(study_name=str(sweeper.study_name), storage=str(sweeper.storage))
    trial_id = st.get_trials(deepcopy=False)[number]._trial_id
    for key, value in attrs.items():
        st._storage.set_trial_user_attr(trial_id, key, value)


def start(sweeper: DictConfig) -> tuple[object, int, int]:
    """Open the study, number this run's trials after its own, and say what is left.

    Returns (study, complete trials so far, trials to run now)."""
    from optuna.trial import TrialState

    global _offset
    study = open_study(sweeper)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    _offset = len(study.get_trials(deepcopy=False))
    return study, done, max(0, int(sweeper.n_trials) - done)
