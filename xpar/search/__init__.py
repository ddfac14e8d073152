"""The search for efficient configurations: `python -m xpar.search` (experiment=search).

A Hydra multirun with the Optuna sweeper over the attention variant (and its knob), experts,
top-k, width and depth, under a budget of training FLOPs per token; each trial a short real
training run, judged on validation loss (down) and tokens/s (up); the Pareto front as a table
and a plot; the study in SQLite, so rerunning the command resumes it.

    cli       the entry point: the multirun, with run_trial as the task function
    trial     one trial: validate, cost, train (or not), return the two objectives
    space     each attention variant's knob (the sweeper's custom_search_space hook)
    study     the study on disk: resume, trial numbering
    callback  Hydra callback: resume before the sweep, the Pareto report after it
    pareto    the front of a set of points; its table and plot
"""

import os

# Optuna 2.x (what hydra-optuna-sweeper 1.3 allows) needs SQLAlchemy < 2, which the `search`
# extra pins; SQLAlchemy 1.4 then warns on every import that the code is not 2.0-ready.
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
