"""block_softmax (the recomputing attention routing and sinkhorn share) equals masked softmax:
its output, its rows' log-sum-exp and the gradients through both, in one chunk or many, with
rows that have no allowed key (zero output, -inf log-sum-exp, no gradient)."""

import pytest
import torch

from xpar.models.attention.block_softmax import block_softmax, merge_softmax


def _reference(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, lse


@pytest.mark.parametrize("chunk_scores", [1, 50, 1 << 23])
def test_equals_masked_softmax_and_its_logsumexp(chunk_scores):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, n, 8, dtype=torch.float64, generator=g) for n in (4, 6, 6))
    allowed = torch.rand(5, 4, 6, generator=g) > 0.4
    allowed[1, 2] = False  # a row with no key
    leaves = [[x.clone().requires_grad_(True) for x in (q, k, v)] for _ in range(2)]
    o, lse = block_softmax(*leaves[0], allowed, chunk_scores)
    o_ref, lse_ref = _reference(*leaves[1], allowed)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    assert (o[:, :, 1, 2] == 0).all() and (lse[:, :, 1, 2] == float("-inf")).all()
    go = torch.randn(o.shape, dtype=o.dtype, generator=g)
    gl = torch.randn(lse.shape, dtype=o.dtype, generator=g)
    # The gradient through lse as a merge uses it (finite rows only: -inf has none).
    finite = torch.isfinite(lse_ref)
    ((o * go).sum() + (lse[finite] * gl[finite]).sum()).backward()
    ((o_ref * go).sum() + (lse_ref[finite] * gl[finite]).sum()).backward()
    for a, b in zip(leaves[0], leaves[1], strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_merge_is_one_softmax_over_both_key_sets():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, 4, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(3, 1, 10, 8, dtype=torch.float64, generator=g) for _ in range(2))
    first = torch.zeros(10, dtype=torch.bool)
    first[:6] = True
    everything = torch.ones(1, 4, 10, dtype=torch.bool)
    o1, l1 = block_softmax(q, k, v, (everything & first))
    o2, l2 = block_softmax(q, k, v, (everything & ~first))
    o, _ = block_softmax(q, k, v, everything)
    torch.testing.assert_close(merge_softmax(o1, l1, o2, l2), o)
