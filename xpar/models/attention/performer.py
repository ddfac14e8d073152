"""Performer attention, FAVOR+ (Choromanski et al. 2021): softmax attention estimated in O(L).

exp(q . k / sqrt(K)) = E_w[phi(x) . phi(y)] for x = q K^-1/4, y = k K^-1/4 and the positive
random features phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(m), w ~ N(0, I_K); m = n_features.
The rows of w are orthogonal in blocks of K (QR of a Gaussian) and rescaled by chi(K)
norms, so each row is still N(0, I) marginally (lower variance, the paper's section 2.4).
The sums are kernelized.py's (causal: chunked prefix sums).

Numerical stabilisation, as the reference implementation: before exp, each query row
subtracts its own max over features and the keys subtract one max over (positions,
features) per head, both detached (a query's exp(-|x|^2/2), one factor per row, is left
to the shift as well). Both shifts cancel exactly between the numerator and the
normaliser; eps is shifted with them, so it is added in the kernel's own scale and the
output stays an exact function of the keys at j <= i (a future key moves the key max, but
the result only by rounding).

Randomness: w is drawn from a generator seeded by (seed, draw) on the CPU in float64, never
the global RNG, so every rank and a resumed run build the same features. The draw index
follows `train_calls`, a buffer counting training forward calls (saved in checkpoints):
call c uses draw c // redraw_interval; eval uses the draw of the last training call;
redraw_interval 0 keeps draw 0. Every layer with the same seed draws the same features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xpar.config.checks import bad, is_int, need_int
from xpar.models.attention import Attention, register
from xpar.models.attention.kernelized import (
    COST_HEAD_DIM,
    check_chunk_eps,
    compute_dtype,
    kernel_cost,
    kernel_memory,
    kernel_sums,
)

# exp of at most this when the eps shift is applied: finite in float32 (e^88 is not).
_MAX_EXP = 80.0


@dataclass
class PerformerOptions:
    n_features: int = 256  # random features m per head
    redraw_interval: int = 1000  # training forward calls between redraws (0: never redraw)
    seed: int = 0  # seeds every draw of the features (with the draw index)
    chunk: int = 64  # positions per causal chunk (a C x C masked block each)
    eps: float = 1e-6  # added to the normaliser, in the kernel's own scale

    def validate(self, prefix: str) -> None:
        need_int(prefix, self, "n_features", 1, "use an integer >= 1 random features, e.g. 256")
        need_int(
            prefix,
            self,
            "redraw_interval",
            0,
            "use an integer >= 0 (training calls between feature redraws; 0 never redraws)",
        )
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad(prefix, "seed", self.seed, "use an integer in [0, 2**63)")
        check_chunk_eps(prefix, self)


def draw_features(n_features: int, head_dim: int, seed: int, draw: int) -> torch.Tensor:
    """[M, K] float64 on the CPU: orthogonal Gaussian blocks with chi-distributed row norms."""
    mixed = (seed * 0x9E3779B97F4A7C15 + draw * 0xBF58476D1CE4E5B9 + 1) % 2**63
    g = torch.Generator().manual_seed(mixed)
    blocks = []
    for _ in range(math.ceil(n_features / head_dim)):
        q_KK, r_KK = torch.linalg.qr(
            torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64)
        )
        # Signs of R's diagonal into Q: Haar-distributed Q, so every row is uniform on the
        # sphere (plain Householder QR is not, and biases the estimate).
        blocks.append((q_KK * torch.sign(torch.diagonal(r_KK))).T)
    w_MK = torch.cat(blocks)[:n_features]
    norms_M = torch.randn(n_features, head_dim, generator=g, dtype=torch.float64).norm(dim=1)
    return w_MK * norms_M[:, None]


def favor_features(
    x_BHLK: torch.Tensor, w_MK: torch.Tensor, is_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi_BHLM, shift): phi(x) = exp(w^T x - |x|^2/2) / sqrt(m), x = input * K^-1/4, as
    exp(-shift) phi(x) with shift the max exponent of the row (queries, [B, H, L, 1]) or of
    the head (keys, [B, H, 1, 1]); the max is detached, the shift keeps |x|^2's gradient
    (for the eps term). A query's factor exp(-|x|^2/2) is one number per row, which the
    normalisation cancels: it lives in the shift only, so no [L, m] pass computes its
    gradient."""
    x_BHLK = x_BHLK * x_BHLK.shape[-1] ** -0.25
    half_sq_BHL1 = (x_BHLK * x_BHLK).sum(-1, keepdim=True) / 2
    e_BHLM = x_BHLK @ w_MK.T
    top_BHL1 = e_BHLM.detach().amax(dim=-1, keepdim=True)
    shift = top_BHL1 - half_sq_BHL1
    log_sqrt_m = 0.5 * math.log(w_MK.shape[0])
    # In place on the product (its backward keeps the inputs, not the output): one pass.
    if is_query:
        return e_BHLM.sub_(top_BHL1 + log_sqrt_m).exp_(), shift
    shift = shift.detach().amax(dim=-2, keepdim=True)
    return e_BHLM.sub_(half_sq_BHL1 + (shift + log_sqrt_m)).exp_(), shift


@register
class PerformerAttention(Attention):
    name = "performer"
    exact = False
    Options = PerformerOptions

    def __init__(self, n_heads: int, head_dim: int, options: PerformerOptions) -> None:
        super().__init__(n_heads, head_dim, options)
        self.register_buffer("train_calls", torch.zeros((), dtype=torch.int64))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def draw_index(self) -> int:
        """The draw this forward uses: training call c uses c // redraw_interval; eval the
        draw of the last training call."""
        interval = self.options.redraw_interval
        calls = int(self.train_calls)
        if interval == 0:
            return 0
        return (calls if self.training else max(calls - 1, 0)) // interval

    def features(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """w_MK of the current draw (cached per draw, device and dtype)."""
        key = (self.draw_index(), device, dtype)
        if self._cache is None or self._cache[0] != key:
            o = self.options
            w_MK = draw_features(o.n_features, self.head_dim, o.seed, key[0])
            self._cache = (key, w_MK.to(device=device, dtype=dtype))
        return self._cache[1]

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        dtype = compute_dtype(q_BHLK)
        w_MK = self.features(q_BHLK.device, dtype)
        if self.training:
            self.train_calls += 1
        phiq_BHLM, shift_q_BHL1 = favor_features(q_BHLK.to(dtype), w_MK, is_query=True)
        phik_BHLM, shift_k_BH11 = favor_features(k_BHLK.to(dtype), w_MK, is_query=False)
        num_BHLK, den_BHL1 = kernel_sums(
            phiq_BHLM, phik_BHLM, v_BHLK.to(dtype), causal, self.options.chunk
        )
        # eps * exp(-shifts): the shifts scale num and den alike, so scale eps with them.
        log_eps_BHL1 = math.log(self.options.eps) - shift_q_BHL1 - shift_k_BH11
        eps_BHL1 = torch.exp(log_eps_BHL1.clamp(max=_MAX_EXP))
        return (num_BHLK / (den_BHL1 + eps_BHL1)).to(v_BHLK.dtype)

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: PerformerOptions) -> float:
        # The causal chunked sums plus the feature maps w^T q and w^T k (2 K m each per head).
        M = options.n_features
        K = min(COST_HEAD_DIM, d_model)
        return kernel_cost(seq_len, d_model, M, options.chunk) + (d_model / K) * 2 * 2 * K * M

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: PerformerOptions) -> float:
        return kernel_memory(seq_len, n_heads, options.n_features, options.chunk)
