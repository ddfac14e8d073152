"""One trial of the search: the task function Hydra's Optuna sweeper launches per trial.

    run_trial(job config) -> (final validation loss, training tokens/s)

The sweeper minimises the first and maximises the second (hydra.sweeper.direction). A trial:

1. trains in its own Hydra job directory, <hydra.sweep.dir>/trial_<N> (train.out_dir is set
   to it, so its checkpoint, metrics.jsonl and log stay with the trial);
2. is validated as the trainer validates; an invalid combination of the searched values is
   not trained: one line, and the result NOT_TRAINED;
3. is costed by xpar.models.cost (training FLOPs per token, with the vocabulary the trainer
   will use); over hydra.callbacks.search.flops_budget it is not trained either: one line,
   NOT_TRAINED. NOT_TRAINED (inf loss, 0 tokens/s) is dominated by every trained trial, so
   the sampler learns to avoid such configs and the Pareto front never shows them;
4. trains with xpar.train.trainer.train in this process (the trials run one after another,
   in one single-rank process group that the search holds: DeepSpeed keeps module-level
   handles to the world group, which a group destroyed after each trial would leave stale)
   and returns its final val loss and tokens/s. A run stopped before its final evaluation
   raises: the sweeper marks the trial failed and stops the search (rerunning resumes it).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from omegaconf import DictConfig

from xpar.config.schema import XparConfig
from xpar.errors import XparConfigError
from xpar.models.cost import ModelCost, model_cost
from xpar.search.study import set_trial_attrs, trial_number

NOT_TRAINED = (math.inf, 0.0)


def trial_cost(cfg: XparConfig) -> ModelCost:
    """The model's cost with the vocabulary the trainer gives it (the tokenizer's, padded)."""
    from xpar.data.tokenizer import build_tokenizer
    from xpar.train.trainer import _padded_vocab

    vocab = cfg.model.vocab_size
    if not vocab:
        extra_id = int(not cfg.model.causal or cfg.task.kind == "classify")
        vocab = _padded_vocab(build_tokenizer(cfg.data.tokenizer).vocab_size + extra_id)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    return model_cost(model_cfg, cfg.moe, cfg.data.seq_len)


def _hold_process_group(backend: str) -> None:
    """One single-rank group for every trial of this process (the trainer leaves it be)."""
    import torch.distributed as dist

    from xpar.parallel.groups import init_parallel

    if not dist.is_initialized():
        init_parallel(ep_size=1, backend=backend)  # sets the launcher's env, as for one process


def _say(text: str) -> None:
    print(text, flush=True)


def run_trial(dcfg: DictConfig) -> tuple[float, float]:
    from hydra.core.hydra_config import HydraConfig

    from xpar.config.store import load_and_validate

    hc = HydraConfig.get()
    number = trial_number(hc.job.num)
    name = f"search: trial {number}"
    budget = float(hc.callbacks.search.flops_budget)
    dcfg.train.out_dir = hc.runtime.output_dir
    try:
        cfg = load_and_validate(dcfg, world_size=1)
    except XparConfigError as e:
        set_trial_attrs(hc.sweeper, number, {"not_trained": "invalid config"})
        _say(f"{name}: not trained: {e}")
        return NOT_TRAINED
    cost = trial_cost(cfg)
    facts = {"flops_per_token": cost.flops_per_token, "active_params": cost.active_params}
    if budget and cost.flops_per_token > budget:
        set_trial_attrs(hc.sweeper, number, {**facts, "not_trained": "over budget"})
        _say(
            f"{name}: not trained: {cost.flops_per_token:.3g} training FLOPs/token is over "
            f"the budget of {budget:.3g} (hydra.callbacks.search.flops_budget)"
        )
        return NOT_TRAINED
    set_trial_attrs(hc.sweeper, number, facts)
    from xpar.train.trainer import train

    _hold_process_group(cfg.parallel.resolved_backend(cuda_available=torch.cuda.is_available()))
    result = train(cfg)
    if result.val_loss_after is None or result.exit_code:
        raise RuntimeError(
            f"{name} stopped at step {result.step} before its final evaluation "
            f"(exit code {result.exit_code}); rerun the search to resume"
        )
    _say(
        f"{name}: val loss {result.val_loss_after:.4f}, {result.tokens_per_s:,.0f} tokens/s, "
        f"{cost.flops_per_token:.3g} FLOPs/token"
    )
    return float(result.val_loss_after), float(result.tokens_per_s)
