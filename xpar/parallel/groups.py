"""Process groups for data x expert parallelism: the one place that knows the rank layout.

world = DP x EP. Expert-parallel (EP) groups are contiguous blocks of ranks,
expert-data-parallel (expert-DP) groups stride across them:

    world 8, ep_size 2:  EP groups        [0,1] [2,3] [4,5] [6,7]
                         expert-DP groups [0,2,4,6] [1,3,5,7]
                         DP group         [0..7] (dense params)

Rank r holds the experts of EP rank r % ep_size; ranks with the same EP rank
hold the same experts and reduce their gradients over the expert-DP group.
This is the same layout as DeepSpeed's `_create_expert_and_data_parallel`
(legacy path, E + D), so xpar.parallel.deepspeed can register these groups in
DeepSpeed's registry under DeepSpeed's own name `ep_size_<n>`.

No deepspeed import here: xpar/parallel/deepspeed.py is the only module that does.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xpar.errors import XparConfigError, XparDistributedError
from xpar.moe.experts import local_experts


@dataclass
class ParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep_rank: int  # rank inside the EP group = which slice of experts this rank holds
    ep_group: dist.ProcessGroup
    expert_dp_size: int
    expert_dp_rank: int
    expert_dp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # all ranks: dense params are replicated everywhere
    backend: str
    # DeepSpeed's name for the EP / expert-DP group pair; expert params carry it as group_name
    expert_group_name: str
    ep_ranks: tuple[int, ...]
    expert_dp_ranks: tuple[int, ...]

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def device(self) -> torch.device:
        """Where this rank's model and collective buffers live: NCCL needs CUDA tensors."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def experts_of_rank(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds (the layout rule of xpar.moe.experts)."""
        return local_experts(num_experts, self.ep_size, self.ep_rank)


def expert_group_name(ep_size: int) -> str:
    # DeepSpeed parses the size back out of this exact pattern (groups._get_max_expert_size)
    return f"ep_size_{ep_size}"


def ep_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """Contiguous blocks: [0..ep-1], [ep..2ep-1], ..."""
    return [list(range(s, s + ep_size)) for s in range(0, world_size, ep_size)]


def expert_dp_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """Ranks with the same EP rank: [i, i+ep, i+2ep, ...] for i in 0..ep-1."""
    return [list(range(i, world_size, ep_size)) for i in range(ep_size)]


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise XparConfigError(
            f"parallel.backend={backend!r} is invalid: use 'auto', 'gloo' or 'nccl'"
        )
    if backend == "nccl" and not torch.cuda.is_available():
        raise XparConfigError(
            "parallel.backend='nccl' needs CUDA, which is not available; use 'gloo' or 'auto'"
        )
    return backend


def resolve_ep_size(ep_size: int, world_size: int) -> int:
    ep = world_size if ep_size == 0 else ep_size
    if ep < 1 or world_size % ep:
        raise XparConfigError(
            f"parallel.ep_size={ep_size} is invalid for world size {world_size}: it must divide "
            f"the world size (world = DP x EP); use 0 for all ranks or a divisor of {world_size}"
        )
    return ep


def env_from_slurm(env: dict | None = None) -> bool:
    """Map Slurm task variables to torch.distributed's when no launcher set them.

    For `srun python -m xpar.train` or submitit with several tasks per job (one
    process per GPU, no torchrun). Returns whether it mapped anything. Call it
    before the config is validated: validation reads WORLD_SIZE.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return False
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks <= 1:
        return False
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    try:
        first = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = env.get("SLURMD_NODENAME", "127.0.0.1")
    env.setdefault("MASTER_ADDR", first)
    # Same port on every task of the job, different across jobs sharing a node.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return True


def init_parallel(ep_size: int = 0, backend: str = "auto", timeout_s: int = 600) -> ParallelGroups:
    """Init the default process group (torchrun env) if needed, then build the EP/expert-DP groups.

    Every rank must call this, in the same order relative to other group creation
    (torch.distributed.new_group is collective). Without torchrun env variables
    and no initialised group, runs as a world of one.
    """
    if not dist.is_initialized():
        backend = resolve_backend(backend)
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            # a plain `python train.py`: a world of one on a private port
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", str(free_port()))
            env.setdefault("RANK", "0")
            env.setdefault("WORLD_SIZE", "1")
            env.setdefault("LOCAL_RANK", "0")
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(env, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            rank_ws = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"])}
            dist.init_process_group(backend, store=store, timeout=timeout, **rank_ws)
    else:
        backend = dist.get_backend()
    world = dist.get_world_size()
    rank = dist.get_rank()
    ep = resolve_ep_size(ep_size, world)

    # new_group is collective: every rank creates every group, in the same order. Without a
    # timeout of their own, torch gives subgroups its 30-minute gloo default.
    pg_timeout = datetime.timedelta(seconds=timeout_s)
    ep_group = expert_dp_group = None
    ep_ranks = edp_ranks = None
    for ranks in ep_group_ranks(world, ep):
        g = dist.new_group(ranks, timeout=pg_timeout)
        if rank in ranks:
            ep_group, ep_ranks = g, ranks
    for ranks in expert_dp_group_ranks(world, ep):
        g = dist.new_group(ranks, timeout=pg_timeout)
        if rank in ranks:
            expert_dp_group, edp_ranks = g, ranks
    dp_group = dist.new_group(list(range(world)), timeout=pg_timeout)
    assert ep_group is not None and expert_dp_group is not None

    groups = ParallelGroups(
        world_size=world,
        rank=rank,
        ep_size=ep,
        ep_rank=ep_ranks.index(rank),
        ep_group=ep_group,
        expert_dp_size=len(edp_ranks),
        expert_dp_rank=edp_ranks.index(rank),
        expert_dp_group=expert_dp_group,
        dp_group=dp_group,
        backend=backend,
        expert_group_name=expert_group_name(ep),
        ep_ranks=tuple(ep_ranks),
        expert_dp_ranks=tuple(edp_ranks),
    )
    check_groups(groups)
    return groups


def _restart_store(env, timeout: datetime.timedelta) -> dist.Store | None:
    """The agent's store under this attempt's prefix, for a group torchrun restarted.

    torchrun --max-restarts keeps one agent store (same port) across attempts, and torch
    2.13's env:// rendezvous adds no attempt prefix, so a restarted group reads the dead
    group's gloo addresses and fails with "connectFullMesh ... Connection refused". Keys
    under `attempt<N>/` are this attempt's only. None: torch's own rendezvous (attempt 0).
    """
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"attempt{attempt}/", client)


def check_groups(groups: ParallelGroups) -> None:
    """Cheap consistency check of the handles against the layout (catches a mixed-up group)."""
    if dist.get_rank(groups.ep_group) != groups.ep_rank:
        raise XparDistributedError(
            f"rank {groups.rank}: EP group rank {dist.get_rank(groups.ep_group)} != {groups.ep_rank}"
        )
    if dist.get_world_size(groups.ep_group) != groups.ep_size:
        raise XparDistributedError(f"rank {groups.rank}: EP group size mismatch")
    if dist.get_rank(groups.expert_dp_group) != groups.expert_dp_rank:
        raise XparDistributedError(f"rank {groups.rank}: expert-DP group rank mismatch")
    if dist.get_world_size(groups.expert_dp_group) != groups.expert_dp_size:
        raise XparDistributedError(f"rank {groups.rank}: expert-DP group size mismatch")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous of one host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
