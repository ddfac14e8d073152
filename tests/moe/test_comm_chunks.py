"""moe.comm_chunks: the routed rows travel in n chunks, pipelined with the experts, in
forward and backward. On real gloo groups (2 and 4 ranks) every n gives the outputs, the
aux loss and every gradient (input, experts, router, shared expert) of n=1 within 1e-6,
with uneven token counts per rank (uneven chunk parts, empty ones) and with every token on
one expert (the others get zero rows). The parity against one process holding every
expert is in test_layer_ep.py (parametrised by chunk count); choose_comm_chunks, the rule
behind comm_chunks=0, is checked here.
"""

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.moe import MoEConfig, MoELayer
from xpar.moe.exchange import choose_comm_chunks
from xpar.testing import run_distributed

D = 16
CASES = {
    "dropless_k2": dict(num_experts=8, top_k=2, capacity_factor=None),
    "capacity_k2_swiglu": dict(num_experts=8, top_k=2, capacity_factor=0.75, activation="swiglu"),
    "expert_choice_shared": dict(
        num_experts=8, router="expert_choice", top_k=1, capacity_factor=1.25, shared_expert_d_ff=8
    ),
    "soft": dict(num_experts=8, router="soft", top_k=1, capacity_factor=None),
}


def run_layer(kw, rank, mode, seq=False):
    """(y, aux loss, {name: grad}) of one EP layer on this rank's tokens; replicated
    parameters' gradients summed over the ranks."""
    import torch.distributed as dist

    torch.manual_seed(7)
    layer = MoELayer(D, MoEConfig(d_ff=24, **kw))
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
        if mode == "one_expert":
            layer.router.weight.zero_()
            layer.router.weight[kw["num_experts"] - 1, 0] = 5.0
    g = torch.Generator().manual_seed(100 + rank)
    T = 16 if mode == "equal" else 13 + 7 * rank
    x = torch.randn(2, T, D, generator=g) if seq else torch.randn(T, D, generator=g)
    if mode == "one_expert":
        x[..., 0] = 10.0
    x.requires_grad_(True)
    y, aux = layer(x)
    ((y * torch.randn(y.shape, generator=g)).sum() + aux.loss).backward()
    grads = {"x": x.grad}
    for name, p in layer.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if not name.startswith("experts."):
            dist.all_reduce(grad)
        grads[name] = grad
    return y.detach(), aux.loss.detach(), grads, layer.dispatcher.traffic


def _maxabs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def max_diffs(base, other) -> dict[str, float]:
    (y0, l0, g0, _), (y1, l1, g1, _) = base, other
    out = {"y": _maxabs(y0 - y1), "aux": (l0 - l1).abs().item()}
    assert g0.keys() == g1.keys()
    for k in g0:
        out[k] = _maxabs(g0[k] - g1[k])
    return out


def _chunks_vs_one(rank, world, cases, chunk_counts, mode, exchange):
    out = {}
    for name in cases:
        seq = CASES[name].get("router") == "soft"
        base = run_layer({**CASES[name], "comm_chunks": 1, "exchange": "counts"}, rank, mode, seq)
        for n in chunk_counts:
            kw = {**CASES[name], "comm_chunks": n, "exchange": exchange}
            got = run_layer(kw, rank, mode, seq)
            # rows and bytes are those of the unchunked exchange
            assert got[3].rows_sent == base[3].rows_sent, (name, n)
            assert got[3].bytes_sent == base[3].bytes_sent, (name, n)
            out[(name, n)] = max_diffs(base, got)
    return out


def check(results, tol=1e-6):
    for rank, per_case in enumerate(results):
        for case, errs in per_case.items():
            for what, err in errs.items():
                assert err <= tol, f"rank {rank} {case}: {what} differs by {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_chunks_equal_one_chunk(world):
    check(run_distributed(_chunks_vs_one, world, list(CASES), (2, 3, 4), "normal", "counts"))


@pytest.mark.slow
def test_chunks_equal_one_chunk_when_one_expert_gets_every_row():
    check(run_distributed(_chunks_vs_one, 2, ["dropless_k2"], (2, 4), "one_expert", "counts"))


def test_more_chunks_than_rows_per_block():
    """7 chunks of blocks of a few rows: most chunk parts are empty."""
    check(run_distributed(_chunks_vs_one, 2, ["capacity_k2_swiglu"], (7,), "normal", "counts"))


def _dedup(rank, world, kw):
    MoELayer(D, MoEConfig(num_experts=8, top_k=2, d_ff=8, dedup_dispatch=True, **kw))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"comm_chunks": 2}, r"moe.comm_chunks=2 .*moe.dedup_dispatch"),
        ({"exchange": "padded"}, r"moe.exchange=padded .*moe.dedup_dispatch"),
    ],
)
def test_dedup_dispatch_refuses_chunks_and_padding(kw, match):
    with pytest.raises(RuntimeError, match=match):
        run_distributed(_dedup, 2, kw, timeout=60)


def test_dedup_on_one_process_takes_any_chunk_count():
    """Nothing travels on one process: the option is moot there, not an error."""
    MoELayer(D, MoEConfig(num_experts=8, dedup_dispatch=True, comm_chunks=4), ep_group="local")


def test_choose_comm_chunks():
    assert choose_comm_chunks(8192, 256, 2, "cpu") == 1  # gloo CPU: pipelining does not pay
    assert choose_comm_chunks(10**6, 4096, 1, "cuda") == 1  # nothing travels
    assert choose_comm_chunks(1024, 256, 8, "cuda") == 1  # small messages: latency-bound
    assert choose_comm_chunks(32768, 256, 8, "cuda") == 2  # 16 MiB of bf16
    assert choose_comm_chunks(32768, 4096, 8, "cuda") == 4  # 256 MiB


def test_config_refuses_negative_chunks():
    with pytest.raises(XparConfigError, match="moe.comm_chunks"):
        MoEConfig(comm_chunks=-1)
