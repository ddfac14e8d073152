"""train.init_from=hf:DIR (xpar.train.init_source): a Mixtral built and saved by the real
transformers package starts an xpar run.

- the value: hf:<dir> without config.json, or a missing directory, is refused at config time
  naming the field and the fix.
- weights: init_from in one process and at EP=2 on 2 gloo ranks holds the imported weights
  (each rank its slice of every expert bank, bitwise) and computes transformers' logits
  (atol 1e-4).
- the trainer (slow): torchrun on 2 ranks at EP=2 with hf_import's overrides trains from it
  and says where its weights came from.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures import golden
from tests.interop.test_hf_interop import _hf_mixtral as hf_mixtral
from xpar.config.store import compose_config
from xpar.errors import XparConfigError
from xpar.interop import hf_import
from xpar.models import MoETransformer
from xpar.testing import run_distributed
from xpar.train import model_setup, saved_model
from xpar.train.init_source import InitSource

transformers = pytest.importorskip("transformers")

VOCAB = 257  # the byte tokenizer's, so the trainer can run it on the committed corpus


def _hf_mixtral(directory: Path) -> Path:
    return hf_mixtral(directory, vocab_size=VOCAB)[1]


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _compose(*overrides):
    return compose_config(
        ["experiment=tiny", "train.out_dir=/tmp/xpar-init-source-unused", *overrides],
        world_size=1,
        cuda_available=False,
    )


def test_hf_value_without_a_model_directory_is_refused(tmp_path):
    for value, match in (
        (f"hf:{tmp_path}", r"train.init_from=.*hf:<dir> names a local Hugging Face model"),
        (f"{tmp_path / 'nowhere'}", r"train.init_from=.*give an existing checkpoint directory"),
    ):
        with pytest.raises(XparConfigError, match=match):
            _compose(f"train.init_from={value}")


def _init_worker(rank: int, world: int, hf_dir: str):
    state, record = hf_import.load_hf(hf_dir)
    torch.manual_seed(3)
    model = MoETransformer(*saved_model.configs(record), ep_group=None if world > 1 else "local")
    moe_cfg = saved_model.configs(record)[1]
    source = InitSource(Path(hf_dir), hf=True)
    model_setup.init_from(model, source, SimpleNamespace(rank=rank), record, moe_cfg, 0)
    mine = saved_model.sliced_state(model, state)
    same = all(torch.equal(v, mine[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        return same, model.eval()(_tokens())[0].numpy()


def test_hf_weights_start_the_model_at_any_ep_size(tmp_path):
    hf_dir = _hf_mixtral(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = hf_model(_tokens()).logits
    for world in (1, 2):
        runs = run_distributed(_init_worker, world, str(hf_dir)) if world > 1 else None
        for same, logits in runs or [_init_worker(0, 1, str(hf_dir))]:
            assert same
            torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_trainer_starts_from_a_hugging_face_model(tmp_path):
    hf_dir = _hf_mixtral(tmp_path)
    state, record = hf_import.load_hf(hf_dir)
    model_cfg, moe_cfg = saved_model.configs(record)
    p = golden.torchrun(
        tmp_path / "run",
        [
            *golden.TINY,
            *golden.data_overrides(tmp_path / "cache"),
            *hf_import.overrides(model_cfg, moe_cfg),
            "train.steps=2",
            "parallel.ep_size=2",
            f"train.init_from=hf:{hf_dir}",
        ],
    )
    out = p.stdout + p.stderr
    assert f"initialised from hf:{hf_dir.resolve()} (a Hugging Face mixtral model)" in out
    assert sorted(golden.losses(tmp_path / "run")) == [1, 2]
