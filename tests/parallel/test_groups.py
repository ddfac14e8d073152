"""Rank layout (world = DP x EP) and its agreement with DeepSpeed's group registry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from xpar.errors import XparConfigError
from xpar.parallel.groups import (
    ep_group_ranks,
    expert_dp_group_ranks,
    expert_group_name,
    resolve_ep_size,
)
from xpar.testing import run_distributed


def test_layout_ep_contiguous_expert_dp_strided():
    assert ep_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_dp_group_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ep_group_ranks(4, 4) == [[0, 1, 2, 3]]
    assert expert_dp_group_ranks(4, 4) == [[0], [1], [2], [3]]
    assert ep_group_ranks(4, 1) == [[0], [1], [2], [3]]
    assert expert_dp_group_ranks(4, 1) == [[0, 1, 2, 3]]
    # every rank is in exactly one group of each kind
    for world, ep in [(8, 2), (12, 4), (6, 3), (1, 1)]:
        for layout in (ep_group_ranks(world, ep), expert_dp_group_ranks(world, ep)):
            assert sorted(r for g in layout for r in g) == list(range(world))
    assert expert_group_name(2) == "ep_size_2"


def test_ep_size_must_divide_world():
    assert resolve_ep_size(0, 8) == 8
    assert resolve_ep_size(4, 8) == 4
    for bad in (3, 16, -1):
        with pytest.raises(XparConfigError, match="parallel.ep_size"):
            resolve_ep_size(bad, 8)


def _groups_and_registry(rank, world):
    from deepspeed.utils import groups as dsg

    from xpar.parallel.deepspeed import init_comm, register_groups
    from xpar.parallel.groups import init_parallel

    out = {}
    # DeepSpeed's own layout for ep_size=2, built before ours under the same name
    init_comm("gloo")
    from deepspeed.comm import comm as dscomm

    # DeepSpeed's shm op is not built: on a fresh machine 4 ranks building it at once hang
    out["shm_op"] = dscomm.cdb.shm_comm_op
    dsg._create_expert_and_data_parallel(2)
    out["ds_layout"] = (
        list(dsg._get_expert_parallel_group_ranks("ep_size_2")),
        list(dsg._get_expert_data_parallel_group_ranks("ep_size_2")),
    )
    for ep in (1, 2, 4):
        g = init_parallel(ep_size=ep, backend="gloo")
        # the handles really connect the ranks the layout says
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=g.ep_group)
        u = torch.tensor([float(rank)])
        dist.all_reduce(u, group=g.expert_dp_group)
        register_groups(g)
        name = g.expert_group_name
        out[ep] = {
            "fields": (g.world_size, g.rank, g.ep_size, g.ep_rank, g.expert_dp_size),
            "ep_ranks": list(g.ep_ranks),
            "edp_ranks": list(g.expert_dp_ranks),
            "ep_sum": t.item(),
            "edp_sum": u.item(),
            "experts": list(g.experts_of_rank(8)),
            # what DeepSpeed now answers for the name our params carry
            "ds": (
                dsg._get_expert_parallel_rank(name),
                dsg._get_expert_data_parallel_rank(name),
                dsg._get_expert_broadcast_src_rank(name),
                dsg._get_expert_parallel_world_size(name),
                dsg._get_expert_data_parallel_world_size(name),
                dsg._get_expert_data_parallel_group(name) is g.expert_dp_group,
                dsg._get_expert_parallel_group(name) is g.ep_group,
            ),
        }
    return out


def test_groups_match_layout_and_deepspeed_registry():
    results = run_distributed(_groups_and_registry, 4)
    for rank, out in enumerate(results):
        assert out["shm_op"] is None
        # our layout is DeepSpeed's (E + D, legacy path)
        assert out["ds_layout"] == (out[2]["ep_ranks"], out[2]["edp_ranks"])
        for ep in (1, 2, 4):
            o = out[ep]
            ep_ranks = [r for r in range(4) if r // ep == rank // ep]
            edp_ranks = [r for r in range(4) if r % ep == rank % ep]
            assert o["fields"] == (4, rank, ep, rank % ep, 4 // ep)
            assert o["ep_ranks"] == ep_ranks and o["edp_ranks"] == edp_ranks
            assert o["ep_sum"] == sum(ep_ranks) and o["edp_sum"] == sum(edp_ranks)
            n_local = 8 // ep
            assert o["experts"] == list(range((rank % ep) * n_local, (rank % ep + 1) * n_local))
            assert o["ds"] == (rank % ep, rank // ep, edp_ranks[0], ep, 4 // ep, True, True)


def test_init_parallel_without_launcher_is_a_world_of_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    code = (
        "from xpar.parallel.groups import init_parallel\n"
        "g = init_parallel(ep_size=0, backend='gloo', timeout_s=30)\n"
        "print(g.world_size, g.rank, g.ep_size, g.expert_dp_size, g.expert_group_name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "1", "1", "ep_size_1"]


def test_env_from_slurm_maps_task_variables_only_without_a_launcher():
    from xpar.parallel.groups import env_from_slurm

    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "",
        "SLURMD_NODENAME": "node7",
        "SLURM_NTASKS_PER_NODE": "2(x2)",
    }
    assert env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert env["MASTER_PORT"] == "21234" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"]
    torchrun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "5", "WORLD_SIZE": "8"}
    assert not env_from_slurm(torchrun) and torchrun["RANK"] == "5"
    assert not env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
