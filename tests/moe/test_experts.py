"""GroupedExperts: the fused autograd node against torch's own gradients."""

import pytest
import torch

from xpar.moe.expert_gemm import ExpertMLP, How
from xpar.moe.experts import GroupedExperts, expert_mlp


@pytest.mark.parametrize("activation", ["gelu", "relu", "squared_relu", "swiglu"])
def test_grouped_mlp_gradcheck_float64(activation):
    torch.manual_seed(0)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    use_w3 = activation == "swiglu"

    def f(x, w1, w2, w3):
        return ExpertMLP.apply(x, [4, 0, 5], How(activation), w1, w2, w3 if use_w3 else None)

    assert torch.autograd.gradcheck(f, (x, w1, w2, w3))


def test_grouped_experts_equal_per_expert_loop_and_empty_experts_get_zero_grad():
    torch.manual_seed(1)
    ex = GroupedExperts(num_experts=4, d_model=6, d_ff=8, activation="gelu")
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 6, requires_grad=True)
    y = ex(x, counts)
    y.square().sum().backward()
    ref_w1 = ex.w1.detach().clone().requires_grad_(True)
    ref_w2 = ex.w2.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    outs = [
        expert_mlp(chunk, ref_w1[i], ref_w2[i], None, "gelu")
        for i, chunk in enumerate(xr.split(counts))
    ]
    torch.cat(outs).square().sum().backward()
    torch.testing.assert_close(y, torch.cat(outs))
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(ex.w1.grad, ref_w1.grad)
    torch.testing.assert_close(ex.w2.grad, ref_w2.grad)
    assert torch.count_nonzero(ex.w1.grad[1]) == 0
