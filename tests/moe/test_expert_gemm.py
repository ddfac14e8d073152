"""Expert GEMM ways (loop, grouped, padded): gradients against finite differences, the
same numbers as one another, recompute bitwise equal to keeping, and the auto rule."""

import warnings

import pytest
import torch

from xpar.moe.expert_gemm import (
    GEMMS,
    ExpertMLP,
    How,
    choose_expert_gemm,
    grouped_unsupported,
    resolve_gemm,
)
from xpar.moe.experts import GroupedExperts

# Zero-row experts first, inside and last: every way must give them an exact zero gradient.
COUNTS = [0, 4, 0, 5, 3, 0]


def _inputs(dtype, activation, d=8, f=16, counts=COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    e, r = len(counts), sum(counts)
    x = torch.randn(r, d, generator=g, dtype=torch.float64)
    w1 = torch.randn(e, d, f, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(e, f, d, generator=g, dtype=torch.float64) / f**0.5
    w3 = torch.randn(e, d, f, generator=g, dtype=torch.float64) / d**0.5
    ts = [x, w1, w2, w3 if activation == "swiglu" else None]
    return [t.to(dtype).requires_grad_(True) if t is not None else None for t in ts]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("gemm", ["loop", "padded"])
def test_gradcheck_float64(gemm, activation):
    ins = _inputs(torch.float64, activation, d=4, f=6)

    def f(*ts):
        return ExpertMLP.apply(ts[0], COUNTS, How(activation, gemm), *ts[1:])

    assert torch.autograd.gradcheck(f, tuple(ins))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_gradcheck_float32(activation):
    # torch's grouped GEMM has no float64; its backward here is checked in float32 against
    # finite differences (loose), and bitwise against the loop below.
    assert grouped_unsupported(torch.device("cpu"), torch.float64, 8, 16) is not None
    ins = _inputs(torch.float32, activation)

    def f(*ts):
        return ExpertMLP.apply(ts[0], COUNTS, How(activation, "grouped"), *ts[1:])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Input #", UserWarning)  # "not double precision"
        assert torch.autograd.gradcheck(
            f, tuple(ins), eps=1e-2, atol=2e-2, rtol=2e-2, fast_mode=True
        )


def _run(gemm, activation, ins, recompute=False, counts=COUNTS):
    ts = [t.detach().clone().requires_grad_(True) if t is not None else None for t in ins]
    out = ExpertMLP.apply(ts[0], counts, How(activation, gemm, recompute), *ts[1:])
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return [out] + [t.grad for t in ts if t is not None]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ways_agree_float32(activation):
    ins = _inputs(torch.float32, activation, d=32, f=64)
    ref = _run("loop", activation, ins)
    for gemm in ("grouped", "padded"):
        for a, b in zip(_run(gemm, activation, ins), ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # The grouped GEMM runs the loop's GEMMs on CPU: the very same numbers.
    assert all(
        torch.equal(a, b) for a, b in zip(_run("grouped", activation, ins), ref, strict=True)
    )
    for i in (0, 2, 5):  # experts without rows: exact zero weight gradients
        assert all(torch.count_nonzero(g[i]) == 0 for g in ref[2:])


@pytest.mark.parametrize("gemm", GEMMS)
def test_recompute_is_bitwise_keeping(gemm):
    ins = _inputs(torch.float32, "swiglu", d=32, f=64)
    kept, redone = _run(gemm, "swiglu", ins), _run(gemm, "swiglu", ins, recompute=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, redone, strict=True))


@pytest.mark.parametrize("gemm", GEMMS)
def test_recompute_saves_only_the_input_rows(gemm):
    ins = _inputs(torch.float32, "swiglu", d=32, f=64)
    params = sum(t.numel() for t in ins[1:])

    def saved(recompute):
        n = []

        def pack(t):
            n.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ExpertMLP.apply(ins[0], COUNTS, How("swiglu", gemm, recompute), *ins[1:])
        return sum(n) - params

    assert saved(True) == ins[0].numel()  # the rows, nothing of width d_ff
    assert saved(False) >= ins[0].numel() + 3 * sum(COUNTS) * 64


def test_all_experts_empty():
    ins = _inputs(torch.float32, "gelu", counts=[0, 0, 0])
    for gemm in GEMMS:
        out, gx, gw1, gw2 = _run(gemm, "gelu", ins, counts=[0, 0, 0])
        assert out.shape == (0, 8) and gx.shape == (0, 8)
        assert torch.count_nonzero(gw1) == 0 and torch.count_nonzero(gw2) == 0


def test_auto_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32, bf16 = torch.float32, torch.bfloat16
    # The benchmark's shapes in float32: grouped.
    assert choose_expert_gemm(4, 8192, 256, 1024, cpu, f32) == "grouped"
    assert choose_expert_gemm(32, 4096, 128, 256, cpu, f32) == "grouped"
    # Half precision, small experts: padded; larger ones: grouped.
    assert choose_expert_gemm(32, 4096, 128, 256, cpu, bf16) == "padded"
    assert choose_expert_gemm(32, 8192, 128, 256, cpu, bf16) == "grouped"
    assert choose_expert_gemm(4, 8192, 256, 1024, cpu, bf16) == "grouped"
    # No grouped GEMM: float64, unaligned widths; CUDA has it for bf16 only.
    assert choose_expert_gemm(4, 64, 8, 16, cpu, torch.float64) == "loop"
    assert choose_expert_gemm(4, 64, 6, 16, cpu, f32) == "loop"
    assert choose_expert_gemm(4, 8192, 256, 1024, cuda, bf16) == "grouped"
    assert choose_expert_gemm(4, 8192, 256, 1024, cuda, f32) == "loop"


def test_grouped_falls_back_to_loop_once_and_says_so():
    args = (3, 12, 40, 24, "cpu", torch.float64)  # a shape no other test resolves
    with pytest.warns(RuntimeWarning, match="expert_gemm=grouped.*float64.*loop"):
        assert resolve_gemm("grouped", *args) == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_gemm("grouped", *args) == "loop"
    assert resolve_gemm("padded", *args) == "padded"


@pytest.mark.parametrize("gemm", ["auto", "grouped", "padded"])
def test_grouped_experts_ways_match_loop(gemm):
    counts = [3, 0, 6, 3]
    outs = []
    for way in ("loop", gemm):
        torch.manual_seed(1)
        ex = GroupedExperts(4, 16, 32, "swiglu", gemm=way)
        x = torch.randn(12, 16, requires_grad=True)
        ex(x, counts).square().sum().backward()
        outs.append([x.grad, ex.w1.grad, ex.w2.grad, ex.w3.grad])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
