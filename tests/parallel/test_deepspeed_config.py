"""build_ds_config, the LR schedule and param groups: no process group needed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from xpar.errors import XparConfigError
from xpar.parallel.deepspeed import (
    build_ds_config,
    make_lr_lambda,
    optimizer_param_groups,
)


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


def test_lr_schedules():
    cos = make_lr_lambda(schedule="cosine", lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [cos(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert cos(4) == pytest.approx(1.0)
    assert cos(9) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert cos(14) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    lin = make_lr_lambda(schedule="linear", lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10)
    assert [lin(s) for s in (0, 5, 10, 11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    const = make_lr_lambda(schedule="constant", lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=5)
    assert [const(s) for s in (0, 1, 50)] == pytest.approx([0.5, 1.0, 1.0])
    with pytest.raises(XparConfigError, match="optim.schedule"):
        make_lr_lambda(schedule="step", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=5)


def test_param_groups_split_dense_expert_decay():
    m = nn.Module()
    m.lin = nn.Linear(3, 3)  # weight decays, bias does not
    m.norm = nn.LayerNorm(3)  # no decay
    m.bank = nn.Parameter(torch.zeros(2, 3, 3))
    m.bank.xpar_expert = True
    m.ebias = nn.Parameter(torch.zeros(2, 3))
    m.ebias.xpar_expert = True
    m.ebias.xpar_no_decay = True
    m.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    groups = optimizer_param_groups(m, "ep_size_2", weight_decay=0.1)
    by = {(g.get("moe", False), g["weight_decay"]): g for g in groups}
    ids = {k: [id(p) for p in g["params"]] for k, g in by.items()}
    assert ids[(False, 0.1)] == [id(m.lin.weight)]
    assert ids[(False, 0.0)] == [id(m.lin.bias), id(m.norm.weight), id(m.norm.bias)]
    assert ids[(True, 0.1)] == [id(m.bank)]
    assert ids[(True, 0.0)] == [id(m.ebias)]
    assert all(g["name"] == "ep_size_2" for g in groups if g.get("moe"))
    # no expert params: no MoE groups (DeepSpeed then builds a plain dense engine)
    dense = optimizer_param_groups(nn.Linear(2, 2), "ep_size_1", weight_decay=0.1)
    assert not any(g.get("moe") for g in dense) and len(dense) == 2
