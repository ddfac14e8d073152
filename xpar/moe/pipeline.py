"""Pipelined expert exchange: rows travel in chunks while the experts compute earlier ones.

One autograd node covers rows out -> experts -> rows back. Forward: every chunk's
all_to_all_single is issued at once (async); as chunk j arrives its rows go through the
experts and its results start back (async) while later chunks are still travelling.
Backward does the same with the gradients: chunk j's output gradients travel to the
experts, its expert backward runs (autograd on the graph kept from forward) and its row
gradients start back while chunk j+1 travels. The expert weights are inputs of the node,
their gradients the sum over chunks. The layout of each chunk comes from
xpar.moe.exchange (counts or padded).

Legend: A rows this rank sends (sorted by expert), D model dim, R rows one chunk
delivers to this rank's experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from xpar.moe.exchange import CountsExchange, PaddedExchange

Exchange = CountsExchange | PaddedExchange


def _pack(rows_AD: torch.Tensor, layout, size: int) -> torch.Tensor:
    """The send buffer of one chunk: rows_AD's chunk rows at their slots (zeros elsewhere)."""
    picked = rows_AD.index_select(0, layout.rows.to(rows_AD.device))
    if layout.slots is None:
        return picked
    buf = rows_AD.new_zeros(size, rows_AD.shape[1])
    return buf.index_copy_(0, layout.slots.to(rows_AD.device), picked)


def _unpack_into(out_AD: torch.Tensor, buf: torch.Tensor, layout) -> None:
    got = buf if layout.slots is None else buf.index_select(0, layout.slots.to(buf.device))
    out_AD.index_copy_(0, layout.rows.to(buf.device), got)


def _spread(rows_RD: torch.Tensor, layout, size: int) -> torch.Tensor:
    """Expert rows back into a receive-shaped buffer (zeros in padding slots)."""
    buf = rows_RD.new_zeros(size, rows_RD.shape[1])
    return buf.index_copy_(0, layout.rows.to(rows_RD.device), rows_RD)


class ExchangeMarks:
    """The watchdog's names of the four exchanges: (out, back, grads out, grads back)."""

    def __init__(self, out, back, grads_out, grads_back):
        self.out, self.back, self.grads_out, self.grads_back = out, back, grads_out, grads_back


def _start(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group):
    return dist.all_to_all_single(
        out, inp.contiguous(), out_splits, in_splits, group=group, async_op=True
    )


def _start_back(rows_RD: torch.Tensor, sent, got, n_recv: int, recv_splits, group):
    """Chunk j's rows (expert outputs in forward, input gradients in backward) start back
    to the ranks they came from: (the buffer they land in, the pending exchange)."""
    buf = rows_RD.new_empty(sent.size, rows_RD.shape[1])
    return buf, _start(buf, _spread(rows_RD, got, n_recv), sent.splits, recv_splits, group)


def _keep_saved_tensors():
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


class _PipelinedExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, rows_AD, ex: Exchange, experts: Callable, group, marks: ExchangeMarks, *params
    ):
        n, D = ex.chunks, rows_AD.shape[1]
        send = [ex.send(j) for j in range(n)]
        bufs = [_pack(rows_AD, send[j], send[j].size) for j in range(n)]
        if ex.header_rows:
            ex.write_header(bufs[0])
        recv_splits = [ex.recv_splits(j) for j in range(n)]
        recv_bufs = [rows_AD.new_empty(sum(s), D) for s in recv_splits]
        works = [
            _start(recv_bufs[j], bufs[j], recv_splits[j], send[j].splits, group) for j in range(n)
        ]
        grad = any(ctx.needs_input_grad)
        recv, ins, outs, back, back_works = [], [], [], [], []
        for j in range(n):
            with marks.out:
                works[j].wait()
            if j == 0 and ex.header_rows:
                ex.read_header(recv_bufs[0])
            recv.append(ex.recv(j))
            x_RD = recv_bufs[j].index_select(0, recv[j].rows.to(rows_AD.device))
            x_RD = x_RD.detach().requires_grad_(grad)
            # The chunk's own graph keeps its tensors: under moe.recompute=block the block's
            # checkpoint hooks would otherwise make every per-chunk autograd.grad in backward
            # rerun the whole block (once per chunk instead of once).
            with torch.set_grad_enabled(grad), _keep_saved_tensors():
                y_RD = experts(x_RD, recv[j].counts_e) if x_RD.shape[0] else None
            ins.append(x_RD)
            outs.append(y_RD)
            y = y_RD.detach() if y_RD is not None else x_RD.detach()
            buf, work = _start_back(
                y, send[j], recv[j], recv_bufs[j].shape[0], recv_splits[j], group
            )
            back.append(buf)
            back_works.append(work)
        out_AD = rows_AD.new_empty(rows_AD.shape)
        for j in range(n):
            with marks.back:
                back_works[j].wait()
            _unpack_into(out_AD, back[j], send[j])
        ctx.ex, ctx.group, ctx.marks = ex, group, marks
        ctx.send, ctx.recv, ctx.recv_splits = send, recv, recv_splits
        ctx.ins, ctx.outs, ctx.params = ins, outs, params
        return out_AD

    @staticmethod
    def backward(ctx, grad_AD):
        grad_AD = grad_AD.contiguous()
        n, D, group, marks = ctx.ex.chunks, grad_AD.shape[1], ctx.group, ctx.marks
        send, recv = ctx.send, ctx.recv
        # Output gradients travel the rows' way out; chunk 0 keeps its (unused) header rows.
        recv_bufs = [grad_AD.new_empty(sum(s), D) for s in ctx.recv_splits]
        works = [
            _start(
                recv_bufs[j],
                _pack(grad_AD, send[j], send[j].size),
                ctx.recv_splits[j],
                send[j].splits,
                group,
            )
            for j in range(n)
        ]
        g_params = [torch.zeros_like(p) for p in ctx.params]
        back, back_works = [], []
        for j in range(n):
            with marks.grads_out:
                works[j].wait()
            x_RD, y_RD = ctx.ins[j], ctx.outs[j]
            if y_RD is None:
                g_x = x_RD.detach()
            else:
                g_y = recv_bufs[j].index_select(0, recv[j].rows.to(grad_AD.device))
                got = torch.autograd.grad(y_RD, (x_RD, *ctx.params), g_y, allow_unused=True)
                g_x = got[0]
                for acc, g in zip(g_params, got[1:], strict=True):
                    if g is not None:
                        acc += g
            buf, work = _start_back(
                g_x, send[j], recv[j], recv_bufs[j].shape[0], ctx.recv_splits[j], group
            )
            back.append(buf)
            back_works.append(work)
        ctx.ins = ctx.outs = None  # free the chunks' graphs as soon as they are used
        g_rows_AD = grad_AD.new_empty(grad_AD.shape)
        for j in range(n):
            with marks.grads_back:
                back_works[j].wait()
            _unpack_into(g_rows_AD, back[j], send[j])
        return (g_rows_AD, None, None, None, None, *g_params)


def pipelined_experts(
    rows_AD: torch.Tensor,
    ex: Exchange,
    experts: torch.nn.Module,
    group,
    marks: ExchangeMarks,
) -> torch.Tensor:
    """rows_AD (this rank's rows, sorted by expert) -> the experts' outputs for them, same
    order; `experts(rows_RD, counts_e)` is called once per chunk on the ranks holding them."""
    params = [p for p in experts.parameters() if p.requires_grad]
    return _PipelinedExperts.apply(rows_AD, ex, experts, group, marks, *params)
