"""Expert GEMMs: the experts' MLP over rows grouped by local expert, three ways, one
autograd node, and the rule that picks the way by shape (moe.expert_gemm).

Every way computes the same products, out = act(x w1 [, x w3]) w2 per expert, and the
same backward; only how one product over all experts is issued differs:
  loop     one torch.mm per expert that has rows, written into preallocated buffers
  grouped  one torch grouped GEMM (F.grouped_mm, offsets per expert) per product
  padded   every expert's rows padded to the longest into [e, C, X]: one torch.bmm
The backward is ours for all three (torch's grouped_mm backward fails on CPU): grad x is
the grouped product with w^T, grad w per expert x^T g. With recompute, the node keeps only
its input rows and redoes h1 (h3) and a in backward: the same ops on the same inputs, so
the results are bitwise those without it.

Legend: R rows, D model dim, F ffn dim, e local experts, C rows of the longest expert,
X, Y either of D, F.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from xpar.activations import get_activation

GEMMS = ("loop", "grouped", "padded")


def grouped_unsupported(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int):
    """Why torch's grouped GEMM cannot run these experts (None when it can).

    CPU (torch 2.13): float32, bfloat16, float16, rows 16-byte aligned. CUDA: bfloat16 per
    torch's documentation (SM >= 80; not measured here)."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    ok = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}
    if dtype not in ok.get(device.type, ()):
        return f"grouped_mm does not support {dtype} on {device.type}"
    per_16 = 16 // torch.empty((), dtype=dtype).element_size()
    if d_model % per_16 or d_ff % per_16:
        return f"grouped_mm needs d_model and d_ff divisible by {per_16} for {dtype}"
    return None


# The auto rule, from `python -m xpar.bench.expert_gemm` (one CPU thread, forward+backward,
# P=2 ranks, median of 3-5 interleaved rounds; time / loop's, balanced and skewed counts):
#                                     float32 gelu          bfloat16 gelu
#   shape        e  rows/e  D    F    grouped   padded      grouped   padded
#   E8  k2 T4096  4   2048 256 1024   1.00 1.02 1.06 1.63   1.00 0.97 1.08 1.51
#   E8  k2 T512   4    256 256 1024   1.00 0.98 1.01 1.47   1.00 0.92 0.98 1.29
#   E32 k1 T4096 16    256 256 1024   0.92 0.98 1.03 1.54   0.97 0.76 1.00 1.39
#   E64 k2 T2048 32    128 128  256   0.95 0.96 1.04 1.61   0.96 0.93 0.70 0.81
# and bf16 beside the bench's shapes (D=128 F=256 unless said): e=16 rows/e=128 padded
# 0.68/0.74, e=32 rows/e=64 0.53/0.59, e=64 rows/e=128 0.69/0.79, e=32 rows/e=128 D=64 F=128
# 0.47/0.52; but rows/e=256 1.10/1.44 and D=256 F=512 rows/e=128 0.79/1.09.
# So: grouped where torch has it (never measurably slower than loop, up to ~10% faster
# with many experts, and bitwise the loop's numbers on CPU: it runs the same GEMMs);
# padded only for half precision on CPU with small experts (rows/e <= 128, F <= 256), where
# one bmm beats e small GEMMs by 20-50% even at a 1.5x max/mean skew; else loop. CUDA:
# grouped for bf16 (torch's kernel for it; not measured here).
def choose_expert_gemm(
    num_local: int, rows: int, d_model: int, d_ff: int, device, dtype: torch.dtype
) -> str:
    """moe.expert_gemm=auto: the way to run `num_local` experts of `rows` rows in all."""
    device = torch.device(device)
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and half and rows <= 128 * num_local and d_ff <= 256:
        return "padded"
    if grouped_unsupported(device, dtype, d_model, d_ff) is None:
        return "grouped"
    return "loop"


_warned: set[tuple] = set()


def resolve_gemm(
    gemm: str, num_local: int, rows: int, d_model: int, d_ff: int, device, dtype
) -> str:
    """The way that runs: auto picked by shape; grouped falls back to loop, said once."""
    device = torch.device(device)
    if gemm == "auto":
        return choose_expert_gemm(num_local, rows, d_model, d_ff, device, dtype)
    if gemm == "grouped":
        why = grouped_unsupported(device, dtype, d_model, d_ff)
        if why is not None:
            key = (device.type, dtype, d_model, d_ff)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"moe.expert_gemm=grouped: {why}; the experts run the loop path instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return "loop"
    return gemm


class _Loop:
    """Flat rows; one torch.mm per expert that has rows."""

    def __init__(self, counts_e: list[int]):
        self.counts_e = counts_e
        self.groups, start = [], 0
        for i, n in enumerate(counts_e):
            if n:
                self.groups.append((i, slice(start, start + n)))
                start += n

    def pack(self, x_RX: torch.Tensor) -> torch.Tensor:
        return x_RX

    def unpack(self, y_RX: torch.Tensor) -> torch.Tensor:
        return y_RX

    def mm(self, a_RX: torch.Tensor, w_eXY: torch.Tensor) -> torch.Tensor:
        """Rows of expert i times w_eXY[i]."""
        out_RY = a_RX.new_empty(a_RX.shape[0], w_eXY.shape[2])
        for i, sl in self.groups:
            torch.mm(a_RX[sl], w_eXY[i], out=out_RY[sl])
        return out_RY

    def mm_t(self, a_RY: torch.Tensor, w_eXY: torch.Tensor) -> torch.Tensor:
        """Rows of expert i times w_eXY[i]^T."""
        out_RX = a_RY.new_empty(a_RY.shape[0], w_eXY.shape[1])
        for i, sl in self.groups:
            torch.mm(a_RY[sl], w_eXY[i].t(), out=out_RX[sl])
        return out_RX

    def wgrad(self, a_RX: torch.Tensor, g_RY: torch.Tensor) -> torch.Tensor:
        """Per expert a^T g: [e, X, Y]; an expert with no rows gets an explicit zero."""
        out_eXY = a_RX.new_empty(len(self.counts_e), a_RX.shape[1], g_RY.shape[1])
        for i, n in enumerate(self.counts_e):
            if n == 0:
                out_eXY[i].zero_()
        for i, sl in self.groups:
            torch.mm(a_RX[sl].t(), g_RY[sl], out=out_eXY[i])
        return out_eXY


class _Grouped(_Loop):
    """Flat rows; one grouped GEMM per product, groups delimited by offsets."""

    def __init__(self, counts_e: list[int], device: torch.device):
        super().__init__(counts_e)
        self.offs_e = torch.tensor(counts_e, device=device).cumsum(0).to(torch.int32)

    def mm(self, a_RX, w_eXY):
        return F.grouped_mm(a_RX, w_eXY, offs=self.offs_e)

    def mm_t(self, a_RY, w_eXY):
        return F.grouped_mm(a_RY, w_eXY.transpose(1, 2), offs=self.offs_e)

    def wgrad(self, a_RX, g_RY):
        # The 2-D x 2-D form: a's columns and g's rows split by the same offsets. a^T as a
        # (column-major) view: a copy would need 16-byte aligned row counts.
        return F.grouped_mm(a_RX.t(), g_RY, offs=self.offs_e)


class _Padded:
    """Every expert's rows padded with zeros to the longest, [e, C, X]; one bmm per product.

    Padding rows stay exact zeros through backward (their output gradient is zero), so they
    add nothing to the weight gradients."""

    def __init__(self, counts_e: list[int], device: torch.device):
        self.e, self.C = len(counts_e), max(counts_e, default=0)
        counts = torch.tensor(counts_e, device=device)
        # The valid slots, taken in expert-then-row order, are the flat rows in their order.
        self.valid_eC = torch.arange(self.C, device=device) < counts.unsqueeze(1)

    def pack(self, x_RX: torch.Tensor) -> torch.Tensor:
        x_eCX = x_RX.new_zeros(self.e, self.C, x_RX.shape[1])
        x_eCX[self.valid_eC] = x_RX
        return x_eCX

    def unpack(self, y_eCX: torch.Tensor) -> torch.Tensor:
        return y_eCX[self.valid_eC]

    def mm(self, a_eCX, w_eXY):
        return torch.bmm(a_eCX, w_eXY)

    def mm_t(self, a_eCY, w_eXY):
        return torch.bmm(a_eCY, w_eXY.transpose(1, 2))

    def wgrad(self, a_eCX, g_eCY):
        return torch.bmm(a_eCX.transpose(1, 2), g_eCY)


def make_kernel(gemm: str, counts_e: list[int], device: torch.device):
    if gemm == "loop":
        return _Loop(counts_e)
    if gemm == "grouped":
        return _Grouped(counts_e, device)
    if gemm == "padded":
        return _Padded(counts_e, device)
    raise AssertionError(f"unresolved expert gemm {gemm!r}")


def _hidden(kernel, x, activation, w1, w3):
    """(h1, h3, a): the expert pre-activations and activation, in the kernel's layout."""
    h1 = kernel.mm(x, w1)
    h3 = kernel.mm(x, w3) if w3 is not None else None
    # Elementwise work once over all rows, not once per expert.
    return h1, h3, get_activation(activation).forward(h1, h3)


class How(NamedTuple):
    """How ExpertMLP runs: the activation, a resolved gemm (loop, grouped, padded) and
    whether backward recomputes the hidden activations instead of keeping them."""

    activation: str
    gemm: str = "loop"
    recompute: bool = False


class ExpertMLP(torch.autograd.Function):
    """All local experts in one autograd node: no per-expert nodes, no cat of outputs,
    no stack of per-expert gradients (which cost as much as the GEMMs on small batches).

    apply(x_RD, counts_e, how, w1_eDF, w2_eFD, w3_eDF); how: a How."""

    @staticmethod
    def forward(ctx, x_RD, counts_e, how, w1_eDF, w2_eFD, w3_eDF):
        kernel = make_kernel(how.gemm, counts_e, x_RD.device)
        x = kernel.pack(x_RD)
        h1, h3, a = _hidden(kernel, x, how.activation, w1_eDF, w3_eDF)
        out_RD = kernel.unpack(kernel.mm(a, w2_eFD))
        if how.recompute:
            ctx.save_for_backward(x_RD, w1_eDF, w2_eFD, w3_eDF)
        else:
            ctx.save_for_backward(x, h1, h3, a, w1_eDF, w2_eFD, w3_eDF)
        ctx.kernel, ctx.activation, ctx.recompute = kernel, how.activation, how.recompute
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD):
        kernel, act = ctx.kernel, ctx.activation
        if ctx.recompute:
            x_RD, w1, w2, w3 = ctx.saved_tensors
            x = kernel.pack(x_RD)
            h1, h3, a = _hidden(kernel, x, act, w1, w3)
        else:
            x, h1, h3, a, w1, w2, w3 = ctx.saved_tensors
        g = kernel.pack(grad_RD.contiguous())
        gw2 = kernel.wgrad(a, g)
        g_h1, g_h3 = get_activation(act).backward(kernel.mm_t(g, w2), h1, h3)
        gw1 = kernel.wgrad(x, g_h1)
        gx = kernel.mm_t(g_h1, w1)
        gw3 = None
        if g_h3 is not None:
            gw3 = kernel.wgrad(x, g_h3)
            gx = gx + kernel.mm_t(g_h3, w3)  # not addmm_: FLOP counters skip it
        return kernel.unpack(gx), None, None, gw1, gw2, gw3


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of aten._grouped_mm for torch.utils.flop_counter.FlopCounterMode, which has no
    formula for it (torch 2.13): without one, moe.expert_gemm=grouped counts zero."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        # per-group weight gradients: the groups split the shared (row) dimension
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    # rows x per-group weights, or batched: every output element is one dot product
    return 2 * math.prod(out_shape) * a_shape[-1]


# custom_mapping for FlopCounterMode (the counter's own table lacks grouped GEMMs).
FLOP_FORMULAS = {torch.ops.aten._grouped_mm: grouped_mm_flops}
