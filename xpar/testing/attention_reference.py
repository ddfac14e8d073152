"""The exact reference attention variants are held to: masked softmax over one L x L score
matrix (tests only: it is quadratic by construction), and a forward-and-gradient check.

Shape suffixes: B batch, H heads, L queries, S keys, K head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def causal_mask(L: int, S: int | None = None, device=None) -> torch.Tensor:
    """[L, S] bool, True where query i may see key j (j <= i, keys aligned at the end)."""
    S = L if S is None else S
    i = torch.arange(L, device=device)[:, None] + (S - L)
    return torch.arange(S, device=device)[None, :] <= i


def masked_attention(
    q_BHLK: torch.Tensor,
    k_BHSK: torch.Tensor,
    v_BHSK: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, over the allowed keys) v; `allowed` is a bool mask broadcast to
    [B, H, L, S] (None: every key). A query with no allowed key gets zeros."""
    scale = 1.0 / math.sqrt(q_BHLK.shape[-1]) if scale is None else scale
    s_BHLS = (q_BHLK @ k_BHSK.transpose(-1, -2)) * scale
    if allowed is not None:
        s_BHLS = s_BHLS.masked_fill(~allowed, float("-inf"))
    p_BHLS = torch.softmax(s_BHLS, dim=-1).nan_to_num(0.0)  # all -inf rows: zeros, not NaN
    return p_BHLS @ v_BHSK


def assert_same_forward_backward(
    fn: Callable[..., torch.Tensor],
    ref: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """fn(*inputs) == ref(*inputs) and so are the gradients of every input (and of fn's own
    parameters' absence: only inputs), under one random upstream gradient."""
    a = [x.detach().clone().requires_grad_(True) for x in inputs]
    b = [x.detach().clone().requires_grad_(True) for x in inputs]
    out_a, out_b = fn(*a), ref(*b)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    g = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(0), dtype=out_a.dtype)
    out_a.backward(g)
    out_b.backward(g)
    for i, (xa, xb) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(xa.grad, xb.grad, atol=atol, rtol=rtol, msg=f"grad of input {i}")


def assert_model_causal(attention: str, options: dict, L: int = 16, d_model: int = 32) -> None:
    """Inside a whole decoder (2 blocks, dropless top-2 MoE, this attention variant): changing
    token t+1 changes no output at positions <= t (beyond 1e-6), for every t, and does change
    t+1's."""
    from xpar.models import MoETransformer
    from xpar.models.config import ModelConfig
    from xpar.moe import MoEConfig

    V = 64
    cfg = ModelConfig(
        vocab_size=V,
        d_model=d_model,
        n_layers=2,
        n_heads=2,
        d_ff=2 * d_model,
        max_seq_len=L,
        attention=attention,
        attention_options=options,
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg, MoEConfig(num_experts=4, top_k=2, d_ff=16, capacity_factor=None))
    model.train()  # where a variant's randomness (feature redraws, hashing) would act
    tokens = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    base = model(tokens)[0]
    for t in range(L - 1):
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 + t) % V
        torch.manual_seed(2)  # the same random draws (if any) as the base pass
        out = model(changed)[0]
        leak = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
        # Not 0: the experts' matmuls over another row count may round differently (1e-8);
        # a leak through attention moves outputs by orders of magnitude more.
        assert leak <= 1e-6, f"{attention} {options}: position <= {t} moved by {leak:.3g}"
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 0, "the change should matter"
