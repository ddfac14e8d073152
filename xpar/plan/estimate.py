"""Memory and all-to-all traffic of one rank of a training job, from its config and cluster.

Pure functions of a validated XparConfig and a Cluster: no process group, no model, no
allocation. xpar.plan.report formats what `estimate` returns; tests/plan checks it against
a real DeepSpeed engine and a real forward and backward on gloo ranks.

Notation: W ranks (GPUs), P expert-parallel group size, E experts, e = E / P local experts,
k experts per token (the router's `experts_per_token`), T = micro_batch * seq_len tokens of
one rank's micro-batch, D d_model, H heads, G kv heads, K = D / H, F ffn widths, V vocab,
b bytes per element of the training dtype (bf16 2, fp32 4).

Parameters per rank: dense params (everything but the expert banks) on every rank; each MoE
block's expert banks sliced over the EP group (xpar.moe.experts.local_experts), e of E.

Optimizer and gradients, as DeepSpeed 0.19.8 lays them out (runtime/zero/stage_1_and_2.py)
for xpar's param groups (xpar.parallel.deepspeed.optimizer_param_groups: dense decay, dense
no-decay (the 1-D norm gains), expert decay):
  stage 0  torch AdamW on the params as they are (fp32 only; xpar refuses bf16 without
           ZeRO): exp_avg and exp_avg_sq, 2 x 4 bytes per local param; full grads in b.
  stage 1  each group is flattened into one buffer padded to a multiple of 2 x dp (dp: the
           group's data-parallel size: all W ranks for dense groups, the expert-DP group of
           W / P ranks for expert groups; plus per-param padding with
           zero_optimization.parameter_alignment) and cut into dp equal partitions; a rank
           keeps an fp32 master copy of its partition (a copy even when training in fp32)
           and Adam's two moments of it: 3 x 4 bytes per partition element. Grads stay whole
           in b, plus the fp32 grad of the partition at the step.
  stage 2  as stage 1, and grads are partitioned too: the partition in b, the reduce bucket
           (zero_optimization.reduce_bucket_size elements in b), the fp32 partition grad.
  stage 3  refused by xpar for MoE (DeepSpeed's expert parallel refuses it): not planned.
Adam's step counters (one scalar per param group or param) are not counted.

Activation memory of one micro-batch (`activation_bytes`): the bytes autograd keeps for
backward, counted tensor by tensor from what this implementation saves (RMSNorm keeps its
fp32 input and rsqrt; attention its projections' inputs, the rotary inputs, q, k, v, the
output and SDPA's log-sum-exp; the FFN its input and F-wide intermediates; an MoE layer its
router input and scores, the expert rows and their intermediates, the combine's rows; the
head its input and fp32 log-probabilities). Measured as: the allocator's peak during one
forward + backward of the model on one micro-batch (xpar.bench.memory.peak_bytes) minus the
bytes of the parameter gradients that backward creates; tests/plan holds it within 15%.
Dense SDPA is flash-like (out + log-sum-exp, no L x L scores); other attention variants add
their `memory_per_token` scores per token in b (approximate). MoE rows: the expected case
of balanced routing (each expert gets its share, capped by capacity), which is also the
exact count when every expert is full (capacity routing at saturation).

moe.recompute: `experts` keeps only the expert rows of each MoE layer (their F-wide
intermediates are recomputed in backward, one layer's at a time); `block` keeps only each
block's input and recomputes a whole block in backward (one block's activations live at a
time). Planned from what each mode must keep, not measured.

All-to-all (`all_to_all`): the rows this rank's dispatcher sends to other ranks' experts,
each D x b bytes. Forward: dispatch out and combine back (the same size); backward: their
gradients, the same two again: 4 x the dispatch per MoE layer per micro-batch. The
dispatcher's own counter (Traffic.bytes_sent) counts the forward dispatch only. Capacity
routing: at most C = ceil(cf k T / E) rows per expert from each rank, so (P - 1) e C rows
when every expert is full: exact at saturation and what a padded exchange always sends.
Dropless: depends on routing; the expected case (uniform routing) T k (P - 1) / P and the
worst case T k (all off-rank). Dedup dispatch (one row per token and destination rank):
expected distinct ranks per token under uniform routing over the token's candidate experts
(group-limited routing: topk_groups of n_groups groups), worst min(k, candidate ranks).
Across nodes: EP groups are contiguous ranks, nodes hold W / nodes consecutive ranks; the
rows bound for a rank on another node are the inter-node share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xpar.errors import XparConfigError
from xpar.models.attention import get_attention
from xpar.models.cost import ModelCost, model_cost
from xpar.moe.plan import token_choice_capacity
from xpar.moe.routers import get_router

ZERO_STAGES = (0, 1, 2)  # stage 3 is refused for MoE (xpar.parallel.ds_config)
RECOMPUTES = ("none", "experts", "block")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# DeepSpeed's nccl_start_alignment_factor: flat groups are padded to a multiple of 2 x dp.
ZERO_ALIGNMENT = 2
BYTE_TOKENIZER_VOCAB = 257  # xpar.data.tokenizer.ByteTokenizer.vocab_size
# Tensors an FFN's activation keeps F wide, autograd through xpar.models.mlp.MLP: gelu its
# input and output; relu its output (the input of w2, the same tensor); squared_relu the
# relu output and the square; swiglu h1, silu(h1), h3 and the product.
_DENSE_FFN_SAVES = {"gelu": 2, "relu": 1, "squared_relu": 2, "swiglu": 4}
# The grouped experts' own autograd function keeps h1, (h3) and the activation's output.
_EXPERT_SAVES = {"gelu": 2, "relu": 2, "squared_relu": 2, "swiglu": 3}


@dataclass(frozen=True)
class Cluster:
    """The machines a plan is for: gpus ranks over `nodes` nodes, gpu_mem bytes each."""

    gpus: int
    nodes: int = 1
    gpu_mem: int = 80 * 10**9

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise XparConfigError(f"--gpus={self.gpus!r} is invalid: use a GPU count >= 1")
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise XparConfigError(f"--nodes={self.nodes!r} is invalid: use a node count >= 1")
        if self.gpus % self.nodes:
            raise XparConfigError(
                f"--nodes={self.nodes} does not divide --gpus={self.gpus}: every node holds "
                f"the same number of GPUs; use a node count that divides {self.gpus}"
            )
        if not isinstance(self.gpu_mem, int) or self.gpu_mem < 1:
            raise XparConfigError(
                f"--gpu-mem={self.gpu_mem!r} is invalid: give the memory of one GPU, e.g. 80GB"
            )

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


@dataclass(frozen=True)
class Params:
    """Parameter counts (elements) of one rank, by DeepSpeed param group."""

    total: int  # the whole model
    active: float  # per token (xpar.models.cost)
    dense: int  # replicated on every rank
    dense_no_decay: int  # the 1-D norm gains (their own param group)
    expert_total: int  # every expert bank of every MoE block
    expert_local: int  # this rank's slice: expert_total * e / E
    cost: ModelCost

    @property
    def local(self) -> int:
        return self.dense + self.expert_local

    def groups(self) -> list[tuple[str, int, bool]]:
        """(name, elements on this rank, expert?) per non-empty optimizer param group."""
        out = [
            ("dense_decay", self.dense - self.dense_no_decay, False),
            ("dense_no_decay", self.dense_no_decay, False),
            ("expert_decay", self.expert_local, True),
        ]
        return [g for g in out if g[1] > 0]


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes of one rank for one ZeRO stage."""

    stage: int
    param_bytes: int  # the params themselves (elements x b)
    flat_param_bytes: int  # stage 1/2: DeepSpeed's padded flat buffers that hold them
    grad_bytes: int
    optimizer_bytes: int  # fp32 master partition + exp_avg + exp_avg_sq (stage 0: moments)
    partition_elements: dict[str, int]  # per param group: this rank's partition
    refused: str = ""  # why xpar would not run this stage with this config ('' = runs)

    @property
    def total_bytes(self) -> int:
        return self.flat_param_bytes + self.grad_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class Activations:
    """Bytes one micro-batch keeps for backward (see the module docstring)."""

    micro_batch: int
    recompute: str
    total: int
    parts: dict[str, int] = field(default_factory=dict)  # per block kind and the head


@dataclass(frozen=True)
class AllToAll:
    """Rows and bytes this rank sends to other ranks' experts, per micro-batch and per step."""

    rows_per_layer: float  # forward dispatch, one MoE layer, one micro-batch: the case below
    case: str  # "capacity bound" (exact when every expert is full), "expected", ...
    worst_rows_per_layer: float
    expected_rows_per_layer: float
    row_bytes: int
    moe_layers: int
    micro_batches: int  # per optimizer step (train.grad_accum)
    inter_node_fraction: float  # of the rows sent off-rank, bound for another node
    count_bytes_per_layer: int  # the per-expert counts exchanged first (int64)

    @property
    def dispatch_bytes(self) -> float:
        """Forward dispatch of one micro-batch over every MoE layer: Traffic.bytes_sent."""
        return self.rows_per_layer * self.row_bytes * self.moe_layers

    @property
    def step_bytes(self) -> float:
        """Per optimizer step: dispatch + combine, forward + backward, every micro-batch."""
        rows = 4 * self.dispatch_bytes + self.count_bytes_per_layer * self.moe_layers
        return rows * self.micro_batches

    @property
    def worst_step_bytes(self) -> float:
        per = 4 * self.worst_rows_per_layer * self.row_bytes + self.count_bytes_per_layer
        return per * self.moe_layers * self.micro_batches

    @property
    def inter_node_step_bytes(self) -> float:
        return 4 * self.dispatch_bytes * self.micro_batches * self.inter_node_fraction


@dataclass(frozen=True)
class Plan:
    world: int
    ep: int
    expert_dp: int
    precision: str
    vocab: int
    params: Params
    zero: dict[int, ZeroMemory]
    stage: int  # the config's parallel.zero_stage
    activations: list[Activations]  # per micro-batch size x recompute
    all_to_all: AllToAll | None
    cluster: Cluster
    micro_batch: int  # the config's
    recompute: str  # the config's

    def activation(self, micro_batch: int, recompute: str) -> Activations:
        for a in self.activations:
            if a.micro_batch == micro_batch and a.recompute == recompute:
                return a
        raise KeyError((micro_batch, recompute))

    def total_bytes(self, micro_batch: int | None = None, recompute: str | None = None) -> int:
        mb = self.micro_batch if micro_batch is None else micro_batch
        rc = self.recompute if recompute is None else recompute
        return self.zero[self.stage].total_bytes + self.activation(mb, rc).total

    def headroom(self, micro_batch: int | None = None, recompute: str | None = None) -> int:
        return self.cluster.gpu_mem - self.total_bytes(micro_batch, recompute)


# --------------------------------------------------------------------------- parameters


def resolved_vocab(cfg) -> int:
    """The model's vocabulary as the trainer builds it (xpar.train.trainer): model.vocab_size,
    or the tokenizer's plus a mask/pad id for an encoder or classifier, padded to 64."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "byte":
        n = BYTE_TOKENIZER_VOCAB
    else:
        from xpar.data.tokenizer import load_tokenizer

        n = load_tokenizer(cfg.data.tokenizer).vocab_size
    n += int(not cfg.model.causal or cfg.task.kind == "classify")
    return int(math.ceil(n / 64) * 64)


def params_of(cfg, vocab: int, ep: int) -> Params:
    import dataclasses

    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    c = model_cost(model, cfg.moe, cfg.data.seq_len)
    expert_total = c.n_moe_layers * cfg.moe.num_experts * c.params_per_expert
    return Params(
        total=c.total_params,
        active=c.active_params,
        dense=c.total_params - expert_total,
        dense_no_decay=c.norm_params,
        expert_total=expert_total,
        expert_local=expert_total // ep,
        cost=c,
    )


# --------------------------------------------------------------------------- ZeRO


def zero_memory(
    params: Params,
    stage: int,
    *,
    world: int,
    ep: int,
    dtype_bytes: int,
    reduce_bucket_size: int,
    parameter_alignment: bool = False,
) -> ZeroMemory:
    b = dtype_bytes
    param_bytes = params.local * b
    if stage == 0:
        return ZeroMemory(
            stage=0,
            param_bytes=param_bytes,
            flat_param_bytes=param_bytes,
            grad_bytes=param_bytes,
            optimizer_bytes=2 * 4 * params.local,
            partition_elements={name: n for name, n, _ in params.groups()},
            refused="" if b == 4 else "bf16 needs ZeRO 1 or 2 (xpar.parallel.ds_config)",
        )
    flat, parts = 0, {}
    for name, n, expert in params.groups():
        dp = world // ep if expert else world
        # parameter_alignment pads every param but the group's last; the planner pads them
        # all (a bound by one param's padding: DeepSpeed sizes the buffer by that bound too)
        pad = _param_padding(params, name, b) if parameter_alignment else 0
        align = ZERO_ALIGNMENT * dp
        padded = math.ceil((n + pad) / align) * align
        flat += padded
        parts[name] = padded // dp
    partition = sum(parts.values())
    grads = params.local * b if stage == 1 else partition * b + reduce_bucket_size * b
    return ZeroMemory(
        stage=stage,
        param_bytes=param_bytes,
        flat_param_bytes=flat * b,
        grad_bytes=grads + 4 * partition,
        optimizer_bytes=3 * 4 * partition,
        partition_elements=parts,
    )


def _param_padding(params: Params, group: str, b: int) -> int:
    # 16-byte alignment per param; the planner does not list params one by one, so it takes
    # the largest padding a group of its size could need per param tensor: a bound.
    return 16 // math.gcd(16, b) - 1


# --------------------------------------------------------------------------- activations


def _rows(cfg, T: int) -> float:
    """Expected kept expert rows of one rank's T tokens, per MoE layer (balanced routing)."""
    moe = cfg.moe
    k = get_router(moe.router).experts_per_token(moe, seq_len=cfg.data.seq_len)
    rows = T * k
    cf = moe.capacity_factor
    if cf is not None and moe.router not in ("expert_choice", "soft", "soft_mix", "base"):
        cap = token_choice_capacity(cf, moe.top_k, T, moe.num_experts)
        rows = min(rows, moe.num_experts * cap)
    return rows


# One function: the terms read top to bottom as the model's forward saves them.
def activation_bytes(  # noqa: C901, PLR0915
    cfg, vocab: int, micro_batch: int, dtype_bytes: int, recompute: str
) -> Activations:
    """Bytes kept for backward by one micro-batch (module docstring); recompute in RECOMPUTES."""
    if recompute not in RECOMPUTES:
        raise XparConfigError(
            f"moe.recompute={recompute!r} is invalid: choose one of {', '.join(RECOMPUTES)}"
        )
    m, moe, b = cfg.model, cfg.moe, dtype_bytes
    L = cfg.data.seq_len
    T = micro_batch * L
    D, H, G, K = m.d_model, m.n_heads, m.kv_heads, m.head_dim
    f32 = b == 4

    def norm() -> int:  # fp32 input (x.float()), rsqrt per token, the normalised y in b
        return 4 * T * D + 4 * T + b * T * D

    def attention() -> int:
        q_cols = D + 2 * G * K
        out = b * T * D  # wqkv's input
        if f32:
            out += 4 * T * q_cols  # rotary keeps views of the qkv output itself
        else:
            out += 4 * T * (D + G * K)  # rotary's fp32 copies of q and k
            out += b * T * q_cols if G == H else 0  # v is a view of qkv's output (SDPA keeps it)
        out += b * T * D * 2  # rotated q; k (repeated to H heads, or already H)
        out += b * T * D if G != H else 0  # v repeated to H heads
        out += b * T * D + 4 * T * H  # SDPA's output and log-sum-exp
        kernel = get_attention(m.attention)
        if m.attention != "dense":
            out += int(b * T * kernel.memory_per_token(L, H, m.attention_opts()))
        out += b * T * D  # wo's input (the heads transposed back: a copy)
        return out

    def dense_ffn() -> int:
        return b * T * D + _DENSE_FFN_SAVES[m.activation] * b * T * m.d_ff

    rows = _rows(cfg, T)
    E = moe.num_experts
    k_top = moe.top_k
    expert_mid = int(_EXPERT_SAVES[moe.activation] * b * rows * moe.d_ff)

    def moe_ffn(keep_mid: bool) -> int:
        out = b * T * D  # router input
        out += T * (8 * E + 28 * k_top + 8)  # fp32 logits and scores, top-k ids and weights
        out += int(b * rows * D)  # expert rows in
        out += expert_mid if keep_mid else 0
        out += int(2 * b * rows * D + b * rows)  # combine: rows out, weights, weighted rows
        if moe.shared_expert_d_ff:
            out += 0 if f32 else b * T * D  # its own input (fp32: the router's, shared)
            out += _DENSE_FFN_SAVES[moe.activation] * b * T * moe.shared_expert_d_ff
        return out

    moe_ids = set(cfg.moe_layer_ids)
    n_moe = len(moe_ids)
    n_dense = m.n_layers - n_moe
    block_common = 2 * norm() + attention()
    dense_block = block_common + dense_ffn()
    moe_block = block_common + moe_ffn(keep_mid=recompute == "none")
    head = norm() + b * T * D + 4 * T * vocab + 8 * T  # final norm, lm_head in, log-probs, targets
    embed = 8 * T + 4 * L * K  # token ids; the rotary tables (one pair for every block)
    parts = {"head+embedding": head + embed}
    if recompute == "block":
        # Each block keeps its input; backward rebuilds one block at a time.
        biggest = max(dense_block if n_dense else 0, moe_block if n_moe else 0)
        parts["block inputs"] = m.n_layers * b * T * D
        parts["one block rebuilt"] = biggest
    else:
        if n_dense:
            parts[f"{n_dense} dense blocks"] = n_dense * dense_block
        if n_moe:
            parts[f"{n_moe} MoE blocks"] = n_moe * moe_block
            if recompute == "experts":
                parts["one layer's experts rebuilt"] = expert_mid
    return Activations(micro_batch, recompute, int(sum(parts.values())), parts)


# --------------------------------------------------------------------------- all-to-all


def all_to_all(
    cfg, cluster: Cluster, ep: int, micro_batch: int, dtype_bytes: int
) -> AllToAll | None:
    n_moe = len(cfg.moe_layer_ids)
    if not n_moe or ep == 1:
        return None
    moe = cfg.moe
    P, E = ep, moe.num_experts
    e = E // P
    T = micro_batch * cfg.data.seq_len
    k = get_router(moe.router).experts_per_token(moe, seq_len=cfg.data.seq_len)
    off = (P - 1) / P
    cf = moe.capacity_factor
    token_choice = moe.router not in ("expert_choice", "soft", "soft_mix", "base")
    if moe.dedup_dispatch and token_choice:
        expected, worst = _dedup_rows(cfg, T, P)
        rows, case = expected, "expected (uniform routing)"
    elif cf is not None and token_choice:
        cap = token_choice_capacity(cf, moe.top_k, T, E)
        worst = (P - 1) * e * cap
        expected = (P - 1) * e * min(cap, T * k / E)
        rows, case = worst, "capacity bound (exact when every expert is full)"
    elif not token_choice and moe.router == "expert_choice":
        # every expert takes the same number of tokens: fixed by capacity
        per_expert = math.ceil(float(cf) * T / E) if cf is not None else T
        rows = expected = worst = (P - 1) * e * min(per_expert, T)
        case = "fixed by capacity"
    else:
        expected, worst = T * k * off, T * k
        rows, case = expected, "expected (uniform routing)"
    return AllToAll(
        rows_per_layer=rows,
        case=case,
        worst_rows_per_layer=worst,
        expected_rows_per_layer=expected,
        row_bytes=cfg.model.d_model * dtype_bytes,
        moe_layers=n_moe,
        micro_batches=cfg.train.grad_accum,
        inter_node_fraction=inter_node_fraction(cluster, P),
        count_bytes_per_layer=(P - 1) * (e + 2) * 8,  # int64 [e + 2] per rank (dispatch.Traffic)
    )


def _dedup_rows(cfg, T: int, P: int) -> tuple[float, float]:
    """Expected and worst off-rank rows of a dedup dispatch (one per token and rank)."""
    moe = cfg.moe
    E, k = moe.num_experts, moe.top_k
    e = E // P
    opts = moe.options()
    n_groups, topk_groups = getattr(opts, "n_groups", 1), getattr(opts, "topk_groups", 1)
    cand = E if n_groups <= 1 else topk_groups * E // n_groups  # experts a token may use
    ranks = max(1, min(P, math.ceil(cand / e)))  # ranks holding them
    per_rank = min(e, cand)
    # a candidate rank is hit unless all k choices miss its per_rank experts
    p_hit = 1.0 - (math.comb(cand - per_rank, k) / math.comb(cand, k) if cand >= k else 0.0)
    expected = T * ranks * p_hit * (P - 1) / P
    worst = T * min(k, ranks, P - 1)
    return expected, worst


def inter_node_fraction(cluster: Cluster, ep: int) -> float:
    """Of the rows a rank sends to the other P - 1 ranks of its EP group (contiguous ranks),
    the share bound for another node (nodes hold consecutive ranks); the worst rank's."""
    if ep <= 1:
        return 0.0
    gpn = cluster.gpus_per_node
    worst = 0.0
    for start in range(0, min(cluster.gpus, max(ep, gpn) * 2), ep):  # the pattern repeats
        members = range(start, start + ep)
        for r in members:
            other = sum(1 for q in members if q // gpn != r // gpn)
            worst = max(worst, other / (ep - 1))
    return worst


# --------------------------------------------------------------------------- the plan


def estimate(cfg, cluster: Cluster, micro_batches: list[int] | None = None) -> Plan:
    """The plan of `cfg` (validated for cluster.gpus ranks) on `cluster`."""
    world = cluster.gpus
    ep = cfg.ep_size(world)
    precision = cfg.parallel.resolved_precision(cuda_available=True)
    b = DTYPE_BYTES[precision]
    vocab = resolved_vocab(cfg)
    params = params_of(cfg, vocab, ep)
    zcfg = _zero_settings(cfg)
    zero = {
        s: zero_memory(
            params,
            s,
            world=world,
            ep=ep,
            dtype_bytes=b,
            reduce_bucket_size=zcfg["reduce_bucket_size"],
            parameter_alignment=zcfg["parameter_alignment"],
        )
        for s in ZERO_STAGES
    }
    mbs = sorted(set(micro_batches or []) | {cfg.train.micro_batch_size})
    acts = [activation_bytes(cfg, vocab, mb, b, rc) for mb in mbs for rc in RECOMPUTES]
    return Plan(
        world=world,
        ep=ep,
        expert_dp=world // ep,
        precision=precision,
        vocab=vocab,
        params=params,
        zero=zero,
        stage=cfg.parallel.zero_stage,
        activations=acts,
        all_to_all=all_to_all(cfg, cluster, ep, cfg.train.micro_batch_size, b),
        cluster=cluster,
        micro_batch=cfg.train.micro_batch_size,
        recompute=cfg.moe.recompute,
    )


def _zero_settings(cfg) -> dict:
    """The ZeRO buckets and alignment the engine will get (xpar.parallel.ds_config)."""
    from xpar.parallel.ds_config import build_ds_config

    p, t = cfg.parallel, cfg.train
    ds = build_ds_config(
        zero_stage=p.zero_stage,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        precision=p.resolved_precision(cuda_available=True),
        extra=dict(p.deepspeed),
        extra_json=p.deepspeed_json,
    )
    z = ds["zero_optimization"]
    return {
        "reduce_bucket_size": int(z.get("reduce_bucket_size", 5e8)),
        "parameter_alignment": bool(z.get("parameter_alignment", False)),
    }
