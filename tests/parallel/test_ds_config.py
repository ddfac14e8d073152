"""The DeepSpeed config builder (pure: no process group, no deepspeed import)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.parallel.ds_config import build_ds_config


def test_config_from_typed_fields():
    cfg = build_ds_config(
        zero_stage=2, micro_batch_size=4, grad_accum=3, grad_clip=0.5, precision="fp32"
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_scatter"] is True
    assert cfg["zero_optimization"]["contiguous_gradients"] is True
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert "optimizer" not in cfg and "scheduler" not in cfg and "train_batch_size" not in cfg
    bf16 = build_ds_config(zero_stage=1, micro_batch_size=1, precision="bf16")
    assert bf16["bf16"] == {"enabled": True}
    auto = build_ds_config(zero_stage=1, micro_batch_size=1, precision="auto")
    assert auto["bf16"]["enabled"] == torch.cuda.is_available()


def test_clip_off():
    assert build_ds_config(zero_stage=1, micro_batch_size=1, grad_clip=0)["gradient_clipping"] == 0
    # ZeRO-0: our norm hook only runs when clipping is on; inf clips nothing
    z0 = build_ds_config(zero_stage=0, micro_batch_size=1, grad_clip=0, precision="fp32")
    assert z0["gradient_clipping"] == math.inf


def test_extra_dict_and_json_merge(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"zero_optimization": {"allgather_bucket_size": 111}, "a": 1, "b": {"c": 1}})
    )
    cfg = build_ds_config(
        zero_stage=1,
        micro_batch_size=1,
        precision="fp32",
        extra={"a": 2, "b": {"d": 2}, "zero_optimization": {"reduce_bucket_size": 222}},
        extra_json=str(path),
    )
    assert cfg["a"] == 2  # the dict wins over the file
    assert cfg["b"] == {"c": 1, "d": 2}  # nested keys merge
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 111
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 222
    assert cfg["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(zero_stage=3), "parallel.zero_stage=3"),
        (dict(zero_stage=0, precision="bf16"), "parallel.zero_stage=0 with parallel.precision"),
        (dict(precision="fp16"), "parallel.precision='fp16'"),
        (dict(grad_clip=-1.0), "optim.grad_clip"),
        (dict(grad_clip=math.nan), "optim.grad_clip"),
        (dict(micro_batch_size=0), "train.micro_batch_size"),
        (dict(grad_accum=0), "train.grad_accum"),
        (dict(extra={"optimizer": {"type": "Adam"}}), "parallel.deepspeed.optimizer"),
        (dict(extra={"gradient_clipping": 1.0}), "parallel.deepspeed.gradient_clipping"),
        (dict(extra={"train_batch_size": 64}), "parallel.deepspeed.train_batch_size"),
        (dict(extra={"bf16": {"enabled": True}}), "parallel.deepspeed.bf16"),
        (dict(extra={"zero_optimization": {"stage": 2}}), "contradicts parallel.zero_stage=1"),
        (dict(extra={"zero_optimization": {"reduce_scatter": False}}), "reduce_scatter"),
        (dict(extra={"zero_optimization": {"elastic_checkpoint": True}}), "elastic_checkpoint"),
        (dict(extra={"zero_optimization": {"offload_optimizer": {}}}), "offload_optimizer"),
        (dict(extra={"data_types": {"grad_accum_dtype": "fp32"}}), "grad_accum_dtype"),
        (dict(extra_json="/nonexistent/ds.json"), "parallel.deepspeed_json"),
    ],
)
def test_refusals_name_the_field(kwargs, match):
    args = dict(zero_stage=1, micro_batch_size=1, precision="fp32") | kwargs
    with pytest.raises(XparConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        build_ds_config(**args)


def test_validating_a_config_does_not_import_deepspeed():
    # a fresh interpreter: this test process may have imported deepspeed already
    code = (
        "import sys\n"
        "import xpar.config\n"
        "cfg = xpar.config.compose_config(\n"
        "    ['+parallel.deepspeed.wall_clock_breakdown=true'], world_size=2, cuda_available=False\n"
        ")\n"
        "from xpar.parallel.ds_config import build_ds_config\n"
        "build_ds_config(micro_batch_size=1, precision='fp32')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"
