"""Seeds and the RNG state a checkpoint carries (torch, numpy, Python), as plain lists."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.seed(0)
    np_state = list(np.random.get_state())
    np_state[1] = np.asarray(state["numpy"], dtype=np.uint32)
    np.random.set_state(tuple(np_state))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
