"""The plan as text: parameters, ZeRO stages, activations, all-to-all, the verdict."""

from __future__ import annotations

from xpar.plan.estimate import RECOMPUTES, Plan

GB = 10**9


def gb(n: float) -> str:
    return f"{n / GB:8.2f} GB"


def count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render(plan: Plan, title: str = "") -> str:
    c, p = plan.cluster, plan.params
    lines = [
        f"plan{': ' + title if title else ''}",
        f"cluster   {c.gpus} GPUs on {c.nodes} node(s) ({c.gpus_per_node} per node), "
        f"{c.gpu_mem / GB:g} GB each; {plan.precision}",
        f"layout    EP {plan.ep} x expert-DP {plan.expert_dp} (dense params over all "
        f"{plan.world} ranks); vocab {plan.vocab}",
        f"params    total {count(p.total)}, active {count(p.active)} per token",
        f"per rank  dense {count(p.dense)} (replicated) + experts {count(p.expert_local)} "
        f"(of {count(p.expert_total)}, sharded over EP {plan.ep}) = {count(p.local)}",
        "",
        "ZeRO stage  params(flat)   grads        optimizer    total",
    ]
    for s, z in plan.zero.items():
        mark = " <- config" if s == plan.stage else ""
        note = f"  (refused: {z.refused})" if z.refused else ""
        lines.append(
            f"  {s}        {gb(z.flat_param_bytes)} {gb(z.grad_bytes)} "
            f"{gb(z.optimizer_bytes)} {gb(z.total_bytes)}{mark}{note}"
        )
    lines.append("  (stage 3: refused by xpar for MoE, DeepSpeed's expert parallel refuses it)")
    lines += ["", "activations per micro-batch (seq_len tokens each), moe.recompute:"]
    lines.append("  micro_batch " + "".join(f"{r:>13}" for r in RECOMPUTES))
    for mb in sorted({a.micro_batch for a in plan.activations}):
        row = "".join(f"{gb(plan.activation(mb, r).total):>13}" for r in RECOMPUTES)
        lines.append(f"  {mb:>11} {row}")
    a = plan.all_to_all
    lines.append("")
    if a is None:
        lines.append("all-to-all  none (no expert parallel)")
    else:
        lines += [
            f"all-to-all  per rank, {a.moe_layers} MoE layers x {a.micro_batches} micro-batch(es)"
            f" of {plan.micro_batch}: {a.case}",
            f"  dispatch forward {count(a.rows_per_layer)} rows/layer x {a.row_bytes} B = "
            f"{gb(a.dispatch_bytes).strip()} per micro-batch (the dispatcher's bytes_sent)",
            f"  per step (dispatch+combine, fwd+bwd, + counts): {gb(a.step_bytes).strip()}; "
            f"worst case {gb(a.worst_step_bytes).strip()}",
            f"  across nodes: {a.inter_node_fraction:.0%} of it, "
            f"{gb(a.inter_node_step_bytes).strip()} per step",
        ]
    total = plan.total_bytes()
    room = plan.headroom()
    verdict = "FITS" if room >= 0 else "DOES NOT FIT"
    lines += [
        "",
        f"{verdict}: ZeRO {plan.stage}, micro-batch {plan.micro_batch}, recompute "
        f"{plan.recompute}: {gb(total).strip()} of {c.gpu_mem / GB:g} GB, headroom "
        f"{gb(room).strip()} ({room / c.gpu_mem:.0%}); not counted: CUDA context, NCCL "
        "buffers, allocator fragmentation, temporaries of the largest op",
    ]
    if room < 0:
        best = _what_fits(plan)
        lines.append(f"  fits instead: {best}" if best else "  nothing planned here fits")
    return "\n".join(lines)


def _what_fits(plan: Plan) -> str:
    options = []
    for s, z in plan.zero.items():
        if z.refused:
            continue
        for a in plan.activations:
            if z.total_bytes + a.total <= plan.cluster.gpu_mem:
                options.append((z.total_bytes + a.total, s, a.micro_batch, a.recompute))
    if not options:
        return ""
    # The largest micro-batch, then the least recomputation (it costs compute), then memory.
    _, s, mb, rc = min(options, key=lambda o: (-o[2], RECOMPUTES.index(o[3]), o[0]))
    return f"parallel.zero_stage={s} train.micro_batch_size={mb} moe.recompute={rc}"
