"""Write whole-bank weights as an xpar checkpoint directory without a training run: the
rank files (dense weights and EP slice r of every expert bank), the layout record and the
run record, each with its checksum file, in the format the trainer writes (so
xpar.train.saved_model.build_model and train.init_from read it at any EP size)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xpar.train import checkpoint as ckpt
from xpar.train.saved_model import is_expert_bank


def write_checkpoint(
    directory: str | Path, state: dict[str, torch.Tensor], record: dict, ep_size: int = 1
) -> Path:
    """`state`: every weight, whole expert banks; `record`: the run record (model and moe
    configs under "model", optionally "tokenizer"). Written as step 0, ep_size rank files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = {
        "format": ckpt.FORMAT,
        "world_size": ep_size,
        "ep_size": ep_size,
        "zero_stage": 0,
        "precision": "fp32",
        "torch": str(torch.__version__),
    }
    for r in range(ep_size):
        mine = {}
        for key, t in state.items():
            if is_expert_bank(key):
                n = t.shape[0] // ep_size
                t = t[r * n : (r + 1) * n]
            mine[key] = t.detach().clone().contiguous()
        rank_state = {"module": mine, "layout": layout}
        ckpt.write_checked(ckpt.rank_file(directory, r), lambda f, s=rank_state: torch.save(s, f))
    ckpt.write_checked(directory / ckpt.LAYOUT_FILE, json.dumps(layout, indent=1))
    client = {"step": 0, "tokens_seen": 0, "world_size": ep_size, **record}
    ckpt.write_client_state(directory, client)
    return directory
