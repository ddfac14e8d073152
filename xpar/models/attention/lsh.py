"""LSH attention (Reformer, Kitaev et al. 2020, arXiv:2001.04451): shared-QK attention within
hash buckets, in chunks of the bucket-sorted sequence; O(L * chunk_len) time and memory.

Shared QK: the keys are the normalised queries, k_j = q_j / ||q_j||; the k_BHLK the model
passes in is ignored (v_BHLK is used). Each of n_hashes rounds hashes k with a random rotation
R of shape [K, n_buckets / 2] (angular LSH: bucket = argmax [kR; -kR]), sorts the positions by
(bucket, position) and splits that order into chunks of chunk_len. The rotations are drawn
from `seed` (round after round from one generator) and held in a buffer: the same on every
rank, in the checkpoint, so resume is bitwise.

Which keys a query sees in a round (its window is its chunk of the sorted order and the one
before, 2 * chunk_len keys; the first chunk has no previous one, there is no wrap-around):
- non-causal: every key of that window (Reformer's chunked attention, across buckets);
- causal: the keys of that window in its own bucket at most chunk_len places back in the
  sorted order, i.e. the last chunk_len keys of its bucket before it. Reformer's rule (the
  whole window under a causal mask by position) is not causal: a future token's bucket
  shifts the sorted order and so which earlier keys share a chunk with a query. Within a
  bucket, the order and the distances of earlier keys depend on earlier tokens only.
A query never attends to itself unless it is its only key: Reformer's rule, its own score is
replaced by -1e5 (not -inf), so a lone query still gets its own value.

Rounds are combined by the log-sum-exp of each round's scores (Reformer's multi-round rule):
o = sum_r exp(lse_r - logsumexp_r lse_r) o_r, the softmax over the rounds' windows joined (a
key seen in two rounds counts twice). Lengths that chunk_len does not divide are padded at
the end with keys no real query sees.

Shape suffixes: B batch, H heads, N hash rounds, L sequence (P padded), C chunks of c
positions, W = 2c window keys, K head dim, U = n_buckets / 2 rotation columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpar.config.checks import bad, is_int
from xpar.models.attention import Attention, register

# Reformer's self-score: a lone query still attends to itself (exp(-1e5) vs any real score
# is 0 in float32, and a round whose only key is the query itself weighs 0 against others).
SELF_SCORE = -1e5
NORM_EPS = 1e-12  # F.normalize's: |q| below it counts as it


@dataclass
class LSHOptions:
    n_hashes: int = 2  # hash rounds (more: fewer keys missed, proportionally more cost)
    n_buckets: int = 32  # buckets per round (even: argmax over [kR; -kR])
    chunk_len: int = 64  # positions per chunk of the sorted order; a query sees 2 chunks
    seed: int = 0  # the rotations' generator seed (the same on every rank and layer)

    def validate(self, prefix: str) -> None:
        for name in ("n_hashes", "chunk_len"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise bad(prefix, name, v, "use an integer >= 1")
        nb = self.n_buckets
        if not is_int(nb) or nb < 2 or nb % 2 != 0:
            raise bad(
                prefix,
                "n_buckets",
                nb,
                "use an even integer >= 2 (angular LSH takes the argmax over [xR; -xR] with "
                "R of n_buckets / 2 columns)",
            )
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad(prefix, "seed", self.seed, "use an integer in [0, 2**63)")


def random_rotations(n_hashes: int, head_dim: int, n_buckets: int, seed: int) -> torch.Tensor:
    """[N, K, U] float32 Gaussian: round r's is the r-th draw of one generator of `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randn(head_dim, n_buckets // 2, generator=g) for _ in range(n_hashes)]
    )


@dataclass
class _Plan:
    """Where each round puts every position: rows_NSCc[r, s, j, a] is the row (of the flat
    [S * P, K] inputs) of the a-th position of chunk j of round r's sorted order; start_NSCc
    the sorted rank where its bucket's run begins (causal only)."""

    rows_NSCc: torch.Tensor
    start_NSCc: torch.Tensor | None
    pad: int  # padding positions (sorted last, all in the last chunk)
    block: int  # chunks per block

    @property
    def chunks(self) -> int:
        return self.rows_NSCc.shape[2]

    def blocks(self):
        """(round, first chunk, end chunk) of every block, round after round."""
        N, C = self.rows_NSCc.shape[0], self.chunks
        for r in range(N):
            for g0 in range(0, C, self.block):
                yield r, g0, min(g0 + self.block, C)


def _add_rows(x_XK: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> None:
    """x[rows] += y for distinct rows (a gather and a copy: faster than index_add_ on CPU,
    and the same sums on every device)."""
    x_XK.index_copy_(0, rows, x_XK.index_select(0, rows) + y.reshape(-1, x_XK.shape[-1]))


class _Block:
    """One block of chunks g0..g1 of one round: its queries, their windows (the previous
    chunk, then their own) and which keys each query may see. The window keys are the rows
    of chunks g0 - 1..g1; the first chunk's missing previous one is a dummy of zeros."""

    def __init__(self, plan: _Plan, r: int, g0: int, g1: int, q_XK, v_XK, norm_X) -> None:
        C = self.C = plan.chunks
        S, c = plan.rows_NSCc.shape[1], plan.rows_NSCc.shape[3]
        lo = g0 if (g0 == 0 or C == 1) else g0 - 1
        self.dummy = C > 1 and g0 == 0
        self.qrows = plan.rows_NSCc[r, :, g0:g1].reshape(-1)
        self.wrows = plan.rows_NSCc[r, :, lo:g1].reshape(-1)
        shape = (S, -1, c, q_XK.shape[-1])
        xq = q_XK.index_select(0, self.wrows).view(shape)
        xn = norm_X.index_select(0, self.wrows).view(S, -1, c, 1)
        xv = v_XK.index_select(0, self.wrows).view(shape)
        if self.dummy:
            xq, xv = (F.pad(x, (0, 0, 0, 0, 1, 0)) for x in (xq, xv))
            xn = F.pad(xn, (0, 0, 0, 0, 1, 0), value=1.0)
        self.xk, self.xn = xq / xn, xn  # every window chunk (G + 1 of them, or the one)
        self.tail = slice(1, None) if C > 1 else slice(None)
        self.q_SGcK = xq[:, self.tail]
        self.k_SGWK, self.v_SGWK = self.window(self.xk), self.window(xv)
        W = self.W = self.k_SGWK.shape[-2]
        self.c, self.g0, self.g1, self.plan = c, g0, g1, plan
        self.lower_SGcW = self.upper_cW = None
        if plan.start_NSCc is not None:
            # Causal: key b of the window (sorted rank first + b) is allowed from the start
            # of the query's bucket run or chunk_len places back, whichever is later, up to
            # the query itself (rank first + W - c + a).
            dev = q_XK.device
            a_c = torch.arange(c, device=dev)
            b_W = torch.arange(W, device=dev)
            first_G = (torch.arange(g0, g1, device=dev) * c - (W - c))[:, None]
            lower_SGc = torch.maximum(plan.start_NSCc[r, :, g0:g1] - first_G, a_c + (W - 2 * c))
            self.lower_SGcW = b_W < lower_SGc[..., None]
            self.upper_cW = b_W > a_c[:, None] + (W - c)

    def window(self, x: torch.Tensor) -> torch.Tensor:
        """[S, G+1, c, K] chunks -> [S, G, 2c, K]: each chunk after its predecessor."""
        return x if self.C == 1 else torch.cat((x[:, :-1], x[:, 1:]), dim=2)

    def unwindow(self, d_SGWK: torch.Tensor) -> torch.Tensor:
        """The window's gradient folded back onto its G + 1 chunks (window's adjoint)."""
        if self.C == 1:
            return d_SGWK
        c = self.c
        out = F.pad(d_SGWK[:, :, c:], (0, 0, 0, 0, 1, 0))
        out[:, :-1] += d_SGWK[:, :, :c]
        return out

    def scores(self, scale: float) -> torch.Tensor:
        s = (self.q_SGcK * scale) @ self.k_SGWK.transpose(-1, -2)
        c, W, inf = self.c, self.W, float("-inf")
        if self.lower_SGcW is not None:
            s.masked_fill_(self.upper_cW, inf)
            s.masked_fill_(self.lower_SGcW, inf)
        else:
            if self.dummy:
                s[:, 0, :, :c] = inf  # the first chunk has no previous one
            if self.plan.pad and self.g1 == self.C:
                s[:, -1, :, W - self.plan.pad :] = inf  # padding keys
        s.diagonal(offset=W - c, dim1=-2, dim2=-1).fill_(SELF_SCORE)  # every row keeps self
        return s


class _LSHCore(torch.autograd.Function):
    """The rounds' windowed softmaxes, combined, block by block of chunks; the backward
    recomputes each block's scores (flash-attention style), so memory stays O(L K).

    q_XK, v_XK: [S * P, K] rows (S = batch x heads); returns o_XK in the same order."""

    @staticmethod
    def forward(ctx, q_XK: torch.Tensor, v_XK: torch.Tensor, plan: _Plan) -> torch.Tensor:
        K = q_XK.shape[-1]
        scale = 1.0 / math.sqrt(K)
        norm_X = q_XK.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        N = plan.rows_NSCc.shape[0]
        o_XK = torch.zeros_like(q_XK)
        lse_X = torch.full(q_XK.shape[:1], float("-inf"), dtype=q_XK.dtype, device=q_XK.device)
        lse_NX = torch.empty((N, q_XK.shape[0]), dtype=q_XK.dtype, device=q_XK.device)
        for r, g0, g1 in plan.blocks():
            blk = _Block(plan, r, g0, g1, q_XK, v_XK, norm_X)
            s = blk.scores(scale)
            m = s.amax(dim=-1, keepdim=True)
            p = s.sub_(m).exp_()
            z = p.sum(dim=-1, keepdim=True)
            o = (p.div_(z) @ blk.v_SGWK).reshape(-1, K)
            lse = (m + z.log()).reshape(-1)
            # Online combination of the rounds: o = sum_r exp(lse_r - lse) o_r.
            old = lse_X.index_select(0, blk.qrows)
            new = torch.logaddexp(old, lse)
            mixed = o_XK.index_select(0, blk.qrows) * (old - new).exp()[:, None]
            o_XK.index_copy_(0, blk.qrows, mixed + o * (lse - new).exp()[:, None])
            lse_X.index_copy_(0, blk.qrows, new)
            lse_NX[r].index_copy_(0, blk.qrows, lse)
        ctx.plan = plan
        ctx.save_for_backward(q_XK, v_XK, norm_X, o_XK, lse_X, lse_NX)
        return o_XK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do_XK: torch.Tensor):
        q_XK, v_XK, norm_X, o_XK, lse_X, lse_NX = ctx.saved_tensors
        plan, K = ctx.plan, q_XK.shape[-1]
        scale = 1.0 / math.sqrt(K)
        # A round's weight w_r = exp(lse_r - lse); with do_r = w_r do, the score gradient is
        # p (do_r v^T - w_r (do . o)): the rounds' mixing folded into flash's D term.
        e_X = (do_XK * o_XK).sum(dim=-1)
        dq_XK, dv_XK = torch.zeros_like(q_XK), torch.zeros_like(v_XK)
        for r, g0, g1 in plan.blocks():
            blk = _Block(plan, r, g0, g1, q_XK, v_XK, norm_X)
            shape = blk.q_SGcK.shape
            lse = lse_NX[r].index_select(0, blk.qrows)
            w = (lse - lse_X.index_select(0, blk.qrows)).exp()
            p = blk.scores(scale).sub_(lse.view(*shape[:-1], 1)).exp_()
            do = (do_XK.index_select(0, blk.qrows) * w[:, None]).view(shape)
            ds = do @ blk.v_SGWK.transpose(-1, -2)
            ds.sub_((w * e_X.index_select(0, blk.qrows)).view(*shape[:-1], 1)).mul_(p)
            ds.diagonal(offset=blk.W - blk.c, dim1=-2, dim2=-1).zero_()  # a constant score
            dv = blk.unwindow(p.transpose(-1, -2) @ do)
            dk = blk.unwindow((ds.transpose(-1, -2) @ blk.q_SGcK) * scale)
            # Through k = q / |q|: dq = (dk - k (k . dk)) / |q| (|q| clamped: dk / eps).
            k, n = blk.xk, blk.xn
            dq = (dk - k * (k * dk).sum(-1, keepdim=True) * (n > NORM_EPS)) / n
            dq[:, blk.tail] += (ds @ blk.k_SGWK) * scale
            if blk.dummy:
                dq, dv = dq[:, 1:], dv[:, 1:]
            _add_rows(dq_XK, blk.wrows, dq)
            _add_rows(dv_XK, blk.wrows, dv)
        return dq_XK, dv_XK, None


@register
class LSHAttention(Attention):
    name = "lsh"
    exact = False
    Options = LSHOptions

    # Score elements per block of chunks (bounds the working memory; tests lower it).
    scores_per_block = 2**21

    def __init__(self, n_heads: int, head_dim: int, options: LSHOptions) -> None:
        super().__init__(n_heads, head_dim, options)
        rot = random_rotations(options.n_hashes, head_dim, options.n_buckets, options.seed)
        self.register_buffer("rotations_NKU", rot)

    def buckets(self, q_BHLK: torch.Tensor) -> torch.Tensor:
        """[B, H, N, L] long: each position's bucket in each round (hashes the shared keys)."""
        k_BHLK = F.normalize(q_BHLK.detach().float(), dim=-1)
        rounds = []
        for rot_KU in self.rotations_NKU.float():
            x_BHLU = k_BHLK @ rot_KU
            # argmax over [x; -x] without building it: the first maximum, x's on a tie.
            top, i_top = x_BHLU.max(dim=-1)
            bottom, i_bottom = x_BHLU.min(dim=-1)
            rounds.append(torch.where(top >= -bottom, i_top, i_bottom + rot_KU.shape[-1]))
        return torch.stack(rounds, dim=2)

    def forward(
        self, q_BHLK: torch.Tensor, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        del k_BHLK  # shared QK: the keys are the normalised queries
        B, H, L, K = q_BHLK.shape
        N, nb = self.options.n_hashes, self.options.n_buckets
        c = min(self.options.chunk_len, L)
        C = -(-L // c)
        P = C * c
        dtype = q_BHLK.dtype
        # Softmax statistics in float32 for half types (as SDPA accumulates).
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        S = B * H
        q_SPK, v_SPK = (
            F.pad(x.to(work), (0, 0, 0, P - L)) if P > L else x.to(work) for x in (q_BHLK, v_BHLK)
        )
        with torch.no_grad():
            bucket_SNP = F.pad(self.buckets(q_BHLK), (0, P - L), value=nb).view(S, N, P)
            pos_P = torch.arange(P, device=q_BHLK.device)
            order_SNP = torch.argsort(bucket_SNP * P + pos_P, dim=-1)  # (bucket, position)
            start_SNP = None
            if causal:  # where each sorted position's bucket run starts
                bucket_SNP = bucket_SNP.gather(-1, order_SNP)
                new_SNP = F.pad(bucket_SNP[..., 1:] != bucket_SNP[..., :-1], (1, 0), value=True)
                start_SNP = torch.where(new_SNP, pos_P, 0).cummax(dim=-1).values
            rows_SNP = order_SNP + P * torch.arange(S, device=q_BHLK.device)[:, None, None]
            plan = _Plan(
                rows_NSCc=rows_SNP.transpose(0, 1).reshape(N, S, C, c),
                start_NSCc=None
                if start_SNP is None
                else start_SNP.transpose(0, 1).reshape(N, S, C, c),
                pad=P - L,
                block=max(1, self.scores_per_block // (S * c * (c if C == 1 else 2 * c))),
            )
        o_XK = _LSHCore.apply(q_SPK.reshape(S * P, K), v_SPK.reshape(S * P, K), plan)
        o_BHPK = o_XK.view(B, H, P, K)
        return (o_BHPK[:, :, :L] if P > L else o_BHPK).to(dtype)

    @classmethod
    def check(cls, model_cfg, prefix: str) -> None:
        opts = model_cfg.attention_opts(prefix)
        where = f"{prefix}.attention_options"
        T, c, nb = model_cfg.max_seq_len, opts.chunk_len, opts.n_buckets
        if T % c != 0:
            raise bad(
                where,
                "chunk_len",
                c,
                f"it must divide {prefix}.max_seq_len={T} (full-length sequences then split into "
                "whole chunks with no padding); choose a divisor of max_seq_len, e.g. "
                f"{max(d for d in range(1, min(c, T) + 1) if T % d == 0)}",
            )
        C = T // c
        if nb > T or (nb % C != 0 and C % nb != 0):
            ok = [n for n in range(2, T + 1, 2) if n % C == 0 or C % n == 0]
            hint = (
                f"e.g. n_buckets={min(ok, key=lambda n: (abs(n - nb), n))}"
                if ok
                else "no even count is: use chunk_len >= 2"
            )
            raise bad(
                where,
                "n_buckets",
                nb,
                f"with {prefix}.max_seq_len={T} and chunk_len={c} the sorted sequence has "
                f"{C} chunks; n_buckets must divide {C} or be a multiple of it (at most "
                "max_seq_len), so that evenly filled buckets start on chunk boundaries or "
                f"fill whole chunks; {hint}",
            )

    @classmethod
    def _window(cls, seq_len: int, options: LSHOptions) -> tuple[int, float]:
        """(keys per query per round, padded / real length)."""
        c = min(options.chunk_len, seq_len)
        C = -(-seq_len // c)
        return (c if C == 1 else 2 * c), C * c / seq_len

    @classmethod
    def flops_per_token(cls, seq_len: int, d_model: int, options: LSHOptions) -> float:
        # Per round, QK^T and AV over the window (2 * 2 * W * D, like dense's 2 * 2 * L * D),
        # and the hash's kR (2 * D * n_buckets / 2); padding positions are computed too.
        W, pad = cls._window(seq_len, options)
        return options.n_hashes * (2 * 2 * W * d_model + d_model * options.n_buckets) * pad

    @classmethod
    def memory_per_token(cls, seq_len: int, n_heads: int, options: LSHOptions) -> float:
        W, pad = cls._window(seq_len, options)
        return n_heads * options.n_hashes * W * pad
