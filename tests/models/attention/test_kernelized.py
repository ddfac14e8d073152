"""The kernelised sums (chunked causal prefix sums) equal their quadratic form, and never
build an L x L tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xpar.models.attention import get_attention
from xpar.models.attention.kernelized import kernel_cost, kernel_memory, kernel_sums
from xpar.testing.attention_reference import assert_same_forward_backward, causal_mask


def quadratic_form(phiq_BHLM, phik_BHLM, v_BHLK, causal, eps):
    """(phi(Q) phi(K)^T, masked) V over its row sums + eps: one L x L matrix (tests only)."""
    w_BHLL = phiq_BHLM @ phik_BHLM.transpose(-1, -2)
    if causal:
        w_BHLL = w_BHLL * causal_mask(w_BHLL.shape[-1])
    return (w_BHLL @ v_BHLK) / (w_BHLL.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_sums_equal_the_quadratic_form(causal, chunk):
    # L = 37: a last partial chunk for every chunk size but 1; chunk 64 > L: one chunk.
    g = torch.Generator().manual_seed(0)
    phiq, phik = (torch.rand(2, 2, 37, 6, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64)

    def chunked(phiq, phik, v):
        num, den = kernel_sums(phiq, phik, v, causal, chunk)
        return num / (den + 1e-6)

    assert_same_forward_backward(
        chunked, lambda a, b, c: quadratic_form(a, b, c, causal, 1e-6), phiq, phik, v
    )


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), tuple(t.shape), str(func)))
        return out


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_no_tensor_is_quadratic_in_L(name):
    """Forward and backward at L = 512, chunk 16: every tensor is far below B H L^2."""
    B, H, L, K = 1, 2, 512, 8
    cls = get_attention(name)
    opts = cls.Options(chunk=16, **({"n_features": 16} if name == "performer" else {}))
    m = cls(H, K, opts)
    q, k, v = (torch.randn(B, H, L, K, requires_grad=True) for _ in range(3))
    with _Shapes() as seen:
        m(q, k, v, causal=True).sum().backward()
    biggest = max(seen.numels)
    assert biggest[0] <= B * H * L * L / 16, biggest


def test_the_cost_is_constant_per_token():
    assert kernel_cost(16384, 512, 256, 64) == kernel_cost(4096, 512, 256, 64)
    assert kernel_memory(16384, 8, None, 64) == kernel_memory(4096, 8, None, 64)
    # Shorter than a chunk: the block is L wide.
    assert kernel_cost(16, 64, None, 64) < kernel_cost(64, 64, None, 64)
