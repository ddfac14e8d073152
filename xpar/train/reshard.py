"""Checkpoints that reshard: a checkpoint saved at one layout (world size, parallel.ep_size,
ZeRO stage 0/1/2, precision) loads into any other valid one, one process included.

Beside the per-rank engine files (which a resume at the same layout reads, bitwise as
before) every checkpoint holds a layout-free "universal" state:

    step_00000006/
      universal<NNNNN>.pt   each rank: its share of the entries and its client state (RNG);
                            rank 0's also the LR scheduler, step counters, grad accumulation
      universal.json        rank 0: the saving layout, each entry's shard file and shape

An entry is one parameter (fp32 master value, exp_avg, exp_avg_sq, optimizer step), one
expert of an expert bank under its GLOBAL id (`blocks.1.ffn.experts.w1/expert_5`), or one
buffer (router balance state: the aux-loss-free bias, a hash table). Each is written once:
dense parameter k by rank k % world, expert bank k by member k % expert_dp of the EP
slice's expert-DP group, buffers (the same on every rank) by rank 0; so the writing is spread
over the ranks. Files go through xpar.train.checkpoint's atomic, checksummed writer and the
step is published by the same `latest` as the rank files.

Why not torch.distributed.checkpoint: DeepSpeed ZeRO-1/2 keep the fp32 master weights and
Adam moments as flat partitions of concatenated parameters (padded, split over the
data-parallel group, experts over their expert-DP group); DCP's planner describes sharded
tensors by per-tensor offsets and has no way to address slices of DeepSpeed's flat buffers
without assembling them first. Once assembled per parameter, a file per rank with named
entries is all that is needed, readable with torch.load(mmap=True) so a rank reads only the
entries it needs.

Loading at another layout: every rank deep-verifies its share of the shard files (i % world
== rank; the outcome all-reduced by xpar.train.resume.loadable, so a damaged file falls back
like a damaged rank file), then reads the dense entries, its own experts' global ids and the
buffers, and sets weights, master fragments, moments and steps into its engine. The LR
scheduler and counters are layout-free (the micro-step counter is rescaled to the new
gradient accumulation). What carries over of the data and RNG (`describe`): the data
position is the global stream's (xpar.data.loader), so it is kept whatever the rank count;
RNG streams are per rank: rank r continues saved rank r's stream where that rank existed,
a rank beyond the saved world keeps the stream a fresh run starts with (train.seed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from xpar.parallel.grad_norm import is_expert_param
from xpar.train import checkpoint as ckpt
from xpar.train.rng import rng_state

if TYPE_CHECKING:
    from xpar.parallel.deepspeed import XparEngine

FORMAT = 1
INDEX = "universal.json"
_FIELDS = ("value", "exp_avg", "exp_avg_sq")


def shard_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"universal{rank:05d}.pt"


def expert_key(name: str, expert: int) -> str:
    return f"{name}/expert_{expert}"


def has_universal(directory: str | Path) -> bool:
    """Whether a checkpoint carries the universal state (written since resharding exists)."""
    return (Path(directory) / INDEX).is_file()


# --------------------------------------------------------------------------- save


def _owner(engine: XparEngine):
    """The rank that writes each parameter: spread dense over all ranks, experts over the
    members of their expert-DP group (the ranks that hold that EP slice)."""
    g = engine.groups
    index: dict[str, int] = {}
    counts = [0, 0]
    for name, p in engine.module.named_parameters():
        kind = int(is_expert_param(p))
        index[name], counts[kind] = counts[kind], counts[kind] + 1

    def owner(name: str, p: torch.nn.Parameter) -> int:
        if is_expert_param(p):
            return g.expert_dp_ranks[index[name] % g.expert_dp_size]
        return index[name] % g.world_size

    return owner


def save(engine: XparEngine, directory: str | Path, layout: dict, client_state: dict) -> None:
    """Collective: this rank's universal shard; rank 0 the index. Call after the rank files."""
    directory, g = Path(directory), engine.groups
    master = engine.master_state(_owner(engine))
    entries: dict[str, dict] = {}
    params = dict(engine.module.named_parameters())
    for name, p in params.items():
        if name not in master:
            continue
        ent = master[name]
        if not is_expert_param(p):
            entries[name] = ent
            continue
        n = p.shape[0]  # the bank's local experts: global ids ep_rank * n ... (local_experts)
        for j in range(n):
            entries[expert_key(name, g.ep_rank * n + j)] = {
                **{k: ent[k][j].clone() for k in _FIELDS},  # a slice would save the whole bank
                "step": ent["step"],
            }
    if g.rank == 0:
        for name, t in engine.module.state_dict().items():
            if name not in params:  # a buffer, the same on every rank
                entries[name] = {"value": t.detach().cpu().clone()}
    shard: dict[str, Any] = {"format": FORMAT, "rank": g.rank, "entries": entries}
    shard["client_state"] = client_state
    if g.rank == 0:
        shard["schedule"] = engine.schedule_state()
    path = shard_file(directory, g.rank)
    for tmp in directory.glob(f".{path.name}.tmp-*"):  # this rank's, from a killed save
        tmp.unlink(missing_ok=True)
    ckpt.write_checked(path, lambda f: torch.save(shard, f))
    listing = {k: (_kind(k, v, params), list(v["value"].shape)) for k, v in entries.items()}
    every: list = [None] * g.world_size
    dist.all_gather_object(every, listing)
    if g.rank == 0:
        index = {
            "format": FORMAT,
            "layout": layout,
            "entries": {
                k: {"shard": r, "kind": kind, "shape": shape}
                for r, part in enumerate(every)
                for k, (kind, shape) in sorted(part.items())
            },
        }
        ckpt.write_checked(directory / INDEX, json.dumps(index, indent=0))


def _kind(key: str, ent: dict, params: Mapping) -> str:
    if key in params:
        return "param"
    return "expert" if "step" in ent else "buffer"


# --------------------------------------------------------------------------- load


def read_index(directory: str | Path) -> dict:
    """universal.json, verified (DamagedCheckpoint when missing, changed or not JSON)."""
    path = Path(directory) / INDEX
    problem = ckpt.file_problem(path)
    if problem is not None:
        raise ckpt.DamagedCheckpoint(problem)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        index["layout"]["world_size"], index["entries"]  # noqa: B018 (the keys must be there)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ckpt.DamagedCheckpoint(f"{path} is not a universal checkpoint index ({e!r})") from e
    return index


def read_share(engine: XparEngine, directory: str | Path, index: dict) -> dict:
    """Rank-local: verify this rank's share of the shard files (their whole checksum) and the
    size of the others; DamagedCheckpoint names the first that is wrong. Returns the state
    xpar.train.checkpoint.load passes to `load`."""
    directory, g = Path(directory), engine.groups
    for s in range(int(index["layout"]["world_size"])):
        problem = ckpt.file_problem(shard_file(directory, s), deep=s % g.world_size == g.rank)
        if problem is not None:
            raise ckpt.DamagedCheckpoint(problem)
    return {"reshard": index, "layout": index["layout"]}


def is_reshard(state: Mapping) -> bool:
    return "reshard" in state


def shapes(engine: XparEngine, index: dict) -> tuple[dict, dict]:
    """(saved, this model's) whole-model shapes as meta tensors, expert banks with every
    expert, for the resume guard (xpar.train.resume_guard.check_resumable)."""
    saved: dict[str, list] = {}
    for key, e in index["entries"].items():
        if e["kind"] == "expert":
            name = key.rsplit("/", 1)[0]
            saved.setdefault(name, [0, *e["shape"]])[0] += 1
        else:
            saved[key] = e["shape"]
    ep = engine.groups.ep_size
    experts = {n for n, p in engine.module.named_parameters() if is_expert_param(p)}
    now = {
        k: [t.shape[0] * ep, *t.shape[1:]] if k in experts else list(t.shape)
        for k, t in engine.module.state_dict().items()
    }

    def meta(d: dict) -> dict:
        return {k: torch.empty(s, device="meta") for k, s in d.items()}

    return meta(saved), meta(now)


def load(engine: XparEngine, directory: str | Path, state: dict) -> dict:
    """Rank-local: this rank's entries into the engine; returns this rank's client state."""
    directory, g, index = Path(directory), engine.groups, state["reshard"]
    entries = index["entries"]
    params = dict(engine.module.named_parameters())
    buffers = [k for k in engine.module.state_dict() if k not in params]
    want: dict[str, list[str]] = {}  # parameter or buffer -> the entry keys it is built from
    for name, p in params.items():
        ids = range(g.ep_rank * p.shape[0], (g.ep_rank + 1) * p.shape[0])
        want[name] = [expert_key(name, i) for i in ids] if is_expert_param(p) else [name]
    for name in buffers:
        want[name] = [name]
    keys = [k for ks in want.values() for k in ks]
    absent = [k for k in keys if k not in entries]
    if absent:
        raise ckpt.DamagedCheckpoint(
            f"{directory / INDEX} has no entry {absent[0]} ({len(absent)} missing)"
        )
    saved_world = int(index["layout"]["world_size"])
    opened = {s: _open(directory, s) for s in sorted({entries[k]["shard"] for k in keys} | {0})}
    if g.rank < saved_world and g.rank not in opened:
        opened[g.rank] = _open(directory, g.rank)
    got = {k: opened[entries[k]["shard"]]["entries"][k] for k in keys}
    master = {}
    for name, p in params.items():
        parts = [got[k] for k in want[name]]
        steps = {int(e["step"]) for e in parts}
        if len(steps) != 1:
            raise ckpt.DamagedCheckpoint(f"{directory}: {name}'s experts are at steps {steps}")
        if is_expert_param(p):
            master[name] = {f: torch.stack([e[f] for e in parts]) for f in _FIELDS}
        else:
            master[name] = {f: parts[0][f] for f in _FIELDS}
        master[name]["step"] = steps.pop()
    engine.set_master_state(master)
    with torch.no_grad():
        for name in buffers:
            buf = engine.module.get_buffer(name)
            buf.copy_(got[name]["value"].to(buf.device, buf.dtype))
    engine.load_schedule_state(opened[0]["schedule"])
    if g.rank < saved_world:
        return opened[g.rank]["client_state"]
    return {"rng": rng_state()}  # a new rank: the stream a fresh run has at this point


def _open(directory: Path, shard: int) -> dict:
    path = shard_file(directory, shard)
    try:  # mmap: only the entries this rank uses are read from disk
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        why = " ".join(str(e).split())[:200]
        raise ckpt.DamagedCheckpoint(f"{path} cannot be read by torch.load ({why})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or "entries" not in data:
        raise ckpt.DamagedCheckpoint(f"{path} holds no universal checkpoint shard")
    return data


# --------------------------------------------------------------------------- the resume line


def _say(layout: Mapping) -> str:
    w, ep = int(layout["world_size"]), int(layout["ep_size"])
    return (
        f"{w} rank{'s' if w != 1 else ''} (ep_size {ep}, expert-DP {w // ep}, "
        f"ZeRO-{layout['zero_stage']}, {layout['precision']})"
    )


def _ranks(lo: int, hi: int) -> str:
    return f"rank {lo}" if hi == lo + 1 else f"ranks {lo}-{hi - 1}"


def _global_batch(run: Mapping | None, world: int) -> int | None:
    t = (run or {}).get("training", {}).get("train", {})
    if "micro_batch_size" not in t or "grad_accum" not in t:
        return None
    return int(t["micro_batch_size"]) * int(t["grad_accum"]) * world


def describe(
    directory: str | Path, saved: Mapping, now: Mapping, shared: Mapping, run: Mapping | None
) -> str:
    """The one resume line of a reshard: from what layout to what, and how far the data
    position and the per-rank RNG streams carry over. `shared` is the checkpoint's
    client_state.json ({} for an engine-only save), `run` this run's record."""
    w0, w1 = int(saved["world_size"]), int(now["world_size"])
    line = (
        f"train.resume: resharding {Path(directory).name} from {_say(saved)} to {_say(now)}: "
        "weights, Adam moments and steps, LR schedule, step counters and buffers (router "
        "balance state) restored per parameter, experts by global id"
    )
    if "data" in shared:
        pos = shared["data"]
        line += (
            f"; the data position is the global stream's and is kept (epoch {pos['epoch']}, "
            f"block {pos['index']})"
        )
        b0, b1 = _global_batch(shared, w0), _global_batch(run, w1)
        if b0 is not None and b1 is not None:
            if b0 == b1:
                line += f", {b1} sequences per step as saved"
            else:
                line += (
                    f", but the global batch changes from {b0} to {b1} sequences per step "
                    "(micro_batch_size x grad_accum x ranks)"
                )
    if w1 == w0:
        line += "; every rank continues its saved RNG stream"
    elif w1 < w0:
        kept = "continues the stream" if w1 == 1 else "continue the streams"
        those, are = ("that", "is") if w0 - w1 == 1 else ("those", "are")
        line += (
            f"; RNG: {_ranks(0, w1)} {kept} of saved {_ranks(0, w1)}, {those} of saved "
            f"{_ranks(w1, w0)} {are} dropped"
        )
    else:
        kept = "continues its saved stream" if w0 == 1 else "continue their saved streams"
        new = "is new and starts" if w1 - w0 == 1 else "are new and start"
        line += (
            f"; RNG: {_ranks(0, w0)} {kept}, {_ranks(w0, w1)} {new} from the stream a fresh "
            "run has (train.seed)"
        )
    return line
