"""Dispatchers: move routed rows to the experts that own them and back.

LocalDispatcher: one process holds every expert (sort-based permutation, no
one-hot [T, E, C] tensors). AllToAllDispatcher: experts sharded over an EP
group; per-expert counts are exchanged first, then rows travel with
all_to_all_single (uneven splits) and come back the same way, one row per
(token, expert) assignment. Its forward_experts also runs the rows in
moe.comm_chunks pipelined chunks (xpar.moe.pipeline) and, for capacity routing, the
padded fixed-capacity exchange with no count exchange (moe.exchange, xpar.moe.exchange).
DedupAllToAllDispatcher (moe.dedup_dispatch): one row
per (token, destination rank); each assignment's row index on that rank and its
combine weight travel beside the rows, the receiver fans rows out to its experts,
weights and sums their outputs per row, and sends one row back per (token, rank).
The only module in xpar/moe that talks to other ranks.

Legend: T tokens, D model dim, E experts, e local experts, P EP ranks,
A kept assignments (this rank's), R rows this rank's experts compute (the
assignments it receives), U (token, rank) rows this rank sends, V rows it receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from xpar.errors import XparConfigError, XparDistributedError
from xpar.moe.exchange import CountsExchange, PaddedExchange, choose_comm_chunks, choose_exchange
from xpar.moe.experts import local_experts
from xpar.moe.pipeline import ExchangeMarks, pipelined_experts
from xpar.moe.plan import RoutingPlan
from xpar.parallel.watchdog import collective

# The watchdog's names for the collectives below (made once: entering one is two list ops).
_SHAPE_CHECK = collective("all_gather (MoE layer shape check)")
_COUNTS = collective("all_to_all (MoE token counts)")
_ROWS_OUT = collective("all_to_all (MoE rows to experts)")
_ROWS_BACK = collective("all_to_all (MoE rows back from experts)")
_GRADS_BACK = collective("all_to_all (MoE row gradients back, in backward)")
_GRADS_OUT = collective("all_to_all (MoE output gradients to experts, in backward)")
_ROW_INDEX = collective("all_to_all (MoE row index per assignment, dedup dispatch)")
_WEIGHTS_OUT = collective("all_to_all (MoE combine weights to experts, dedup dispatch)")
_WEIGHT_GRADS = collective("all_to_all (MoE combine weight gradients back, in backward)")
_MARKS = ExchangeMarks(_ROWS_OUT, _ROWS_BACK, _GRADS_OUT, _GRADS_BACK)
_LOAD_SUM = collective("all_reduce (MoE tokens per expert)")
_BALANCE_SUM = collective("all_reduce (MoE balance-loss load over every rank)")


def sum_over_all_ranks(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of t summed over every rank (moe.balance_scope=global); t itself
    when torch.distributed is not initialised or has one rank."""
    t = t.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with _BALANCE_SUM:
            dist.all_reduce(t)
    return t


@dataclass
class Traffic:
    """Rows and bytes this rank's dispatcher sent to other ranks' experts (forward, the
    tokens' way out; the way back is the same size), counted since it was built.
    rows_sent / bytes_sent: real rows only, whatever the exchange or chunking.
    meta_bytes_sent: what travels beside the rows (dedup dispatch: a row index and a combine
    weight per assignment on another rank; the weights' gradients come back in backward).
    pad_bytes_sent: the padded exchange's zero rows sent to other ranks (they travel back,
    and again in backward, like the rows). count_bytes_sent: the per-expert counts sent to
    other ranks: the count exchange (int64, [e + 2] per rank: counts, tokens, rows), or the
    padded exchange's header rows (counts inside the rows' buffer, counted here, not as
    padding)."""

    rows_sent: int = 0
    bytes_sent: int = 0
    meta_bytes_sent: int = 0
    pad_bytes_sent: int = 0
    count_bytes_sent: int = 0
    calls: int = 0


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the gradient travels the reverse way.
    marks: the watchdog's names of the forward and the backward exchange."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, marks):
        ctx.splits, ctx.group, ctx.mark = (send_splits, recv_splits), group, marks[1]
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        with marks[0]:
            dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty(sum(send_splits), *grad.shape[1:])
        with ctx.mark:
            dist.all_to_all_single(
                out, grad.contiguous(), send_splits, recv_splits, group=ctx.group
            )
        return out, None, None, None, None


@dataclass
class DispatchState:
    counts_e: list[int]  # rows per local expert, as the experts see them
    perm_R: torch.Tensor | None = None  # received (source, expert) order -> (expert, source)
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None


@dataclass
class DedupState(DispatchState):
    """What the dedup dispatch's combine needs, beside the experts' counts."""

    fan_R: torch.Tensor | None = None  # received row (of V) each expert row came from
    weight_R: torch.Tensor | None = None  # each expert row's combine weight
    token_U: torch.Tensor | None = None  # the token of each row this rank sent
    row_splits: tuple[list[int], list[int]] | None = None  # rows sent, received per rank


def combine_rows(out_AD: torch.Tensor, plan: RoutingPlan, num_tokens: int) -> torch.Tensor:
    """Weighted scatter-add of expert outputs back onto their tokens."""
    w_A1 = plan.weight_A.to(out_AD.dtype).unsqueeze(1)
    y_TD = out_AD.new_zeros(num_tokens, out_AD.shape[1])
    return y_TD.index_add(0, plan.token_idx_A, out_AD * w_A1)


class _Done:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def wait(self) -> torch.Tensor:
        return self.t


class _Pending:
    def __init__(self, t: torch.Tensor, work):
        self.t, self.work = t, work

    def wait(self) -> torch.Tensor:
        with _LOAD_SUM:
            self.work.wait()
        return self.t


class LocalDispatcher:
    ep_size = 1
    ep_rank = 0

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.traffic = Traffic()

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, DispatchState]:
        rows_AD = x_TD.index_select(0, plan.token_idx_A)
        return rows_AD, DispatchState(counts_e=plan.counts_E.tolist())

    def combine(
        self, out_RD: torch.Tensor, state: DispatchState, plan: RoutingPlan
    ) -> torch.Tensor:
        return combine_rows(out_RD, plan, plan.num_tokens)

    def check_agreement(self, x_TD: torch.Tensor) -> None:
        pass

    def forward_experts(self, x_TD, plan, experts, **_exchange) -> torch.Tensor:
        """dispatch, experts, combine: y_TD (one process: nothing travels, nothing to chunk)."""
        rows_RD, state = self.dispatch(x_TD, plan)
        return self.combine(experts(rows_RD, state.counts_e), state, plan)

    def start_sum_over_group(self, t: torch.Tensor) -> _Done:
        return _Done(t)


class AllToAllDispatcher:
    """Rank i of `group` holds the experts `local_experts(E, ep_size, i)`."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        # Contiguous slices in rank order: the count exchange below relies on it.
        self.num_local = len(local_experts(num_experts, self.ep_size, self.ep_rank))
        self._checked: set[tuple] = set()
        self.traffic = Traffic()
        # From the last count exchange: the token count every rank routed (None: they
        # differed) and the most rows one rank sent.
        self._same_tokens: int | None = None
        self._most_rows = 0

    def check_agreement(self, x_TD: torch.Tensor) -> None:
        """Once per shape: all ranks must agree on E and D, else the count
        exchange would hang or return garbage. Fails loudly instead."""
        key = (x_TD.shape[1], x_TD.dtype)
        if key in self._checked:
            return
        mine = torch.tensor([self.num_experts, x_TD.shape[1]], dtype=torch.long)
        if x_TD.device.type != "cpu":
            mine = mine.to(x_TD.device)
        everyone = [torch.empty_like(mine) for _ in range(self.ep_size)]
        with _SHAPE_CHECK:
            dist.all_gather(everyone, mine, group=self.group)
            seen = [tuple(t.tolist()) for t in everyone]
        if len(set(seen)) != 1:
            table = ", ".join(f"rank {r}: E={e} D={d}" for r, (e, d) in enumerate(seen))
            raise XparDistributedError(
                "expert-parallel ranks disagree about the MoE layer (num_experts, d_model): "
                f"{table}; every rank of an EP group must build the same layer"
            )
        self._checked.add(key)

    def _exchange_counts(self, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows this rank sends per (rank, local expert) and receives per (rank, own local
        expert), [P, e] each. Each rank's token and row counts ride along (two columns), so
        every rank learns whether all ranks route the same number of tokens (what the
        padded exchange needs) and the most rows one rank sends (what comm_chunks=0 uses)."""
        P, e = self.ep_size, self.num_local
        send_Pc = torch.empty(P, e + 2, dtype=torch.long, device=plan.counts_E.device)
        send_Pc[:, :e] = plan.counts_E.view(P, e)
        send_Pc[:, e] = plan.num_tokens
        send_Pc[:, e + 1] = plan.token_idx_A.numel()
        recv_Pc = torch.empty_like(send_Pc)
        with _COUNTS:  # the .cpu() waits for the exchange (NCCL returns before it ends)
            dist.all_to_all_single(recv_Pc, send_Pc, group=self.group)
            recv_Pc = recv_Pc.cpu()
        tokens = recv_Pc[:, e].tolist()
        self._same_tokens = tokens[0] if len(set(tokens)) == 1 else None
        self._most_rows = int(recv_Pc[:, e + 1].max())
        self.traffic.count_bytes_sent += (P - 1) * (e + 2) * 8
        return send_Pc[:, :e].cpu(), recv_Pc[:, :e]

    def _count_rows(self, send_Pe: torch.Tensor, row_bytes: int) -> None:
        off_rank = int(send_Pe.sum()) - int(send_Pe[self.ep_rank].sum())
        self.traffic.rows_sent += off_rank
        self.traffic.bytes_sent += off_rank * row_bytes
        self.traffic.calls += 1

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, DispatchState]:
        self.check_agreement(x_TD)
        return self._dispatch_rows(x_TD, plan, *self._exchange_counts(plan))

    def _dispatch_rows(
        self,
        x_TD: torch.Tensor,
        plan: RoutingPlan,
        send_counts_Pe: torch.Tensor,
        recv_counts_Pe: torch.Tensor,
    ) -> tuple[torch.Tensor, DispatchState]:
        """The rows' exchange in one piece, once the counts are known."""
        rows_AD = x_TD.index_select(0, plan.token_idx_A)  # sorted by expert, so by rank
        send_splits = send_counts_Pe.sum(1).tolist()
        recv_splits = recv_counts_Pe.sum(1).tolist()
        self._count_rows(send_counts_Pe, x_TD.shape[1] * x_TD.element_size())
        marks = (_ROWS_OUT, _GRADS_BACK)
        rows_RD = _AllToAll.apply(rows_AD, send_splits, recv_splits, self.group, marks)
        # Received as [source rank][local expert]; experts want [local expert][source].
        perm_R = expert_major(recv_counts_Pe)
        if perm_R is not None:
            rows_RD = rows_RD.index_select(0, perm_R.to(rows_RD.device))
        state = DispatchState(
            counts_e=recv_counts_Pe.sum(0).tolist(),
            perm_R=perm_R,
            send_splits=send_splits,
            recv_splits=recv_splits,
        )
        return rows_RD, state

    def forward_experts(
        self,
        x_TD: torch.Tensor,
        plan: RoutingPlan,
        experts: torch.nn.Module,
        *,
        chunks: int = 1,
        exchange: str = "counts",
        capacity: int | None = None,
        top_k: int = 1,
    ) -> torch.Tensor:
        """Rows to their experts, `experts(rows_RD, counts_e)`, results back, combined:
        y_TD. chunks: moe.comm_chunks (0: choose_comm_chunks); exchange: moe.exchange;
        capacity: row slots per expert, the same on every rank (None: dropless, counts
        only); top_k: rows per token before drops (moe.exchange=auto's padding estimate)."""
        self.check_agreement(x_TD)
        kind = self._exchange_kind(x_TD, plan, exchange, capacity, top_k)
        D, row_bytes = x_TD.shape[1], x_TD.shape[1] * x_TD.element_size()
        if kind == "padded":
            send_Pe = plan.counts_E.view(self.ep_size, self.num_local).cpu()
            if chunks == 0:
                rows = self.num_experts * capacity
                chunks = choose_comm_chunks(rows, D, self.ep_size, x_TD.device.type)
            ex = PaddedExchange(send_Pe, capacity, chunks, D, x_TD.element_size(), plan.num_tokens)
            self._count_rows(send_Pe, row_bytes)
            others = self.ep_size - 1
            real_off = int(send_Pe.sum()) - int(send_Pe[self.ep_rank].sum())
            self.traffic.pad_bytes_sent += (
                others * self.num_local * capacity - real_off
            ) * row_bytes
            self.traffic.count_bytes_sent += others * ex.header_rows * row_bytes
        else:
            send_Pe, recv_Pe = self._exchange_counts(plan)
            if chunks == 0:
                chunks = choose_comm_chunks(self._most_rows, D, self.ep_size, x_TD.device.type)
            if chunks == 1:  # today's path: autograd through two exchanges
                rows_RD, state = self._dispatch_rows(x_TD, plan, send_Pe, recv_Pe)
                return self.combine(experts(rows_RD, state.counts_e), state, plan)
            self._count_rows(send_Pe, row_bytes)
            ex = CountsExchange(send_Pe, recv_Pe, chunks)
        rows_AD = x_TD.index_select(0, plan.token_idx_A)
        out_AD = pipelined_experts(rows_AD, ex, experts, self.group, _MARKS)
        return combine_rows(out_AD, plan, plan.num_tokens)

    def _exchange_kind(
        self,
        x_TD: torch.Tensor,
        plan: RoutingPlan,
        exchange: str,
        capacity: int | None,
        top_k: int,
    ) -> str:
        """counts or padded for this call; the same on every rank. auto picks padded only
        once a count exchange has shown every rank routing this many tokens (padded needs
        it) and choose_exchange says the padding costs less than the count exchange."""
        if exchange != "auto":
            return exchange
        if capacity is None or self._same_tokens != plan.num_tokens:
            return "counts"
        return choose_exchange(
            plan.num_tokens,
            top_k,
            capacity,
            self.num_experts,
            x_TD.shape[1],
            x_TD.element_size(),
            x_TD.device.type,
        )

    def combine(
        self, out_RD: torch.Tensor, state: DispatchState, plan: RoutingPlan
    ) -> torch.Tensor:
        if state.perm_R is not None:
            inv_R = torch.empty_like(state.perm_R)
            inv_R[state.perm_R] = torch.arange(state.perm_R.numel(), device=inv_R.device)
            out_RD = out_RD.index_select(0, inv_R)
        marks = (_ROWS_BACK, _GRADS_OUT)
        out_AD = _AllToAll.apply(out_RD, state.recv_splits, state.send_splits, self.group, marks)
        return combine_rows(out_AD, plan, plan.num_tokens)

    def start_sum_over_group(self, t: torch.Tensor) -> _Pending:
        t = t.detach().clone()
        return _Pending(t, dist.all_reduce(t, group=self.group, async_op=True))


def unique_rows(
    token_idx_A: torch.Tensor, dest_A: torch.Tensor, num_tokens: int, ep_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows a dedup dispatch sends, one per distinct (token, destination rank), ordered
    by rank then token: (token_U, rows per rank [P], each assignment's row among those its
    rank receives [A])."""
    T = max(num_tokens, 1)
    key_U, inv_A = torch.unique(dest_A * T + token_idx_A, sorted=True, return_inverse=True)
    rows_P = torch.bincount(key_U // T, minlength=ep_size)
    start_P = torch.cumsum(rows_P, 0) - rows_P
    return key_U % T, rows_P, inv_A - start_P[dest_A]


def expert_major(recv_counts_Pe: torch.Tensor) -> torch.Tensor | None:
    """The permutation from received order ([source rank][local expert]) to the experts'
    ([local expert][source rank]); None when it is the identity."""
    P, e = recv_counts_Pe.shape
    if e == 1 or P == 1:
        return None
    seg_R = torch.repeat_interleave(
        torch.arange(P * e, device=recv_counts_Pe.device), recv_counts_Pe.reshape(-1)
    )
    return torch.argsort((seg_R % e) * P + seg_R // e, stable=True)


def received_row(
    row_R: torch.Tensor, recv_counts_Pe: torch.Tensor, recv_rows_P: torch.Tensor
) -> torch.Tensor:
    """Each received assignment's row among all V received rows: its index on its source's
    rows plus the rows of the sources before (rows arrive numbered source by source)."""
    src_R = torch.repeat_interleave(
        torch.arange(recv_rows_P.numel(), device=row_R.device), recv_counts_Pe.sum(1)
    )
    return row_R.long() + (torch.cumsum(recv_rows_P, 0) - recv_rows_P)[src_R]


class DedupAllToAllDispatcher(AllToAllDispatcher):
    """AllToAllDispatcher that sends a token once per destination rank (moe.dedup_dispatch).

    Forward: rows x[token_U] to their ranks; per assignment its row index there (int32,
    not differentiable) and its combine weight (differentiable: the router's gradient comes
    back through the reverse exchange). The receiver computes expert rows out_RD from the
    fanned-out rows, sums weight * out per received row, and sends one row back per
    (token, rank); the sender adds them onto the tokens. Backward is autograd through the
    index ops and the differentiable exchanges. The assignments' local experts need no
    message: the counts exchange already says how many each (source, expert) holds.
    """

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, DedupState]:
        self.check_agreement(x_TD)
        P, e, D = self.ep_size, self.num_local, x_TD.shape[1]
        dest_A = plan.expert_idx_A // e
        token_U, rows_P, row_A = unique_rows(plan.token_idx_A, dest_A, x_TD.shape[0], P)
        # One exchange: assignments per (rank, local expert), then rows per rank.
        send_Pc = torch.cat([plan.counts_E.view(P, e), rows_P.unsqueeze(1)], dim=1)
        recv_Pc = torch.empty_like(send_Pc)
        with _COUNTS:  # the .tolist() waits for the exchange (NCCL returns before it ends)
            dist.all_to_all_single(recv_Pc, send_Pc, group=self.group)
            sums = [send_Pc[:, :e].sum(1), recv_Pc[:, :e].sum(1), rows_P, recv_Pc[:, e]]
            send_asg, recv_asg, send_rows, recv_rows = torch.stack(sums).tolist()
        self._count(send_asg, send_rows, D * x_TD.element_size(), plan.weight_A.element_size())
        rows_VD = _AllToAll.apply(
            x_TD.index_select(0, token_U),
            send_rows,
            recv_rows,
            self.group,
            (_ROWS_OUT, _GRADS_BACK),
        )
        row_R = row_A.new_empty(sum(recv_asg), dtype=torch.int32)
        with _ROW_INDEX:
            dist.all_to_all_single(
                row_R, row_A.to(torch.int32), recv_asg, send_asg, group=self.group
            )
        weight_R = _AllToAll.apply(
            plan.weight_A, send_asg, recv_asg, self.group, (_WEIGHTS_OUT, _WEIGHT_GRADS)
        )
        fan_R = received_row(row_R, recv_Pc[:, :e], recv_Pc[:, e])
        perm_R = expert_major(recv_Pc[:, :e])
        if perm_R is not None:
            fan_R, weight_R = fan_R[perm_R], weight_R[perm_R]
        state = DedupState(
            counts_e=recv_Pc[:, :e].sum(0).tolist(),
            fan_R=fan_R,
            weight_R=weight_R,
            token_U=token_U,
            row_splits=(send_rows, recv_rows),
        )
        return rows_VD.index_select(0, fan_R), state

    def forward_experts(self, x_TD, plan, experts, **_exchange) -> torch.Tensor:
        """Unchunked, counts first: MoELayer refuses moe.comm_chunks > 1 and
        moe.exchange=padded with moe.dedup_dispatch."""
        rows_RD, state = self.dispatch(x_TD, plan)
        return self.combine(experts(rows_RD, state.counts_e), state, plan)

    def _count(self, send_asg: list[int], send_rows: list[int], row_bytes: int, w_bytes: int):
        off_rows = sum(send_rows) - send_rows[self.ep_rank]
        off_asg = sum(send_asg) - send_asg[self.ep_rank]
        self.traffic.rows_sent += off_rows
        self.traffic.bytes_sent += off_rows * row_bytes
        self.traffic.meta_bytes_sent += off_asg * (4 + w_bytes)  # int32 index + weight
        self.traffic.count_bytes_sent += (self.ep_size - 1) * (self.num_local + 1) * 8
        self.traffic.calls += 1

    def combine(self, out_RD: torch.Tensor, state: DedupState, plan: RoutingPlan) -> torch.Tensor:
        send_rows, recv_rows = state.row_splits
        w_R1 = state.weight_R.to(out_RD.dtype).unsqueeze(1)
        # One row per received (token, source): the weighted sum of its experts' outputs.
        y_VD = out_RD.new_zeros(sum(recv_rows), out_RD.shape[1])
        y_VD = y_VD.index_add(0, state.fan_R, out_RD * w_R1)
        marks = (_ROWS_BACK, _GRADS_OUT)
        y_UD = _AllToAll.apply(y_VD, recv_rows, send_rows, self.group, marks)
        y_TD = y_UD.new_zeros(plan.num_tokens, y_UD.shape[1])
        return y_TD.index_add(0, state.token_U, y_UD)


def make_dispatcher(
    num_experts: int, ep_group, dedup: bool = False
) -> LocalDispatcher | AllToAllDispatcher:
    """ep_group: a ProcessGroup; None for the whole world when torch.distributed is
    initialised (else this process alone); "local" for this process alone. dedup: under
    expert parallel, send a token once per rank (DedupAllToAllDispatcher)."""
    if isinstance(ep_group, str):
        if ep_group != "local":
            raise XparConfigError(
                f"ep_group={ep_group!r} is invalid: use a ProcessGroup, None or 'local'"
            )
        return LocalDispatcher(num_experts)
    if ep_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return LocalDispatcher(num_experts)
        ep_group = dist.group.WORLD
    if dist.get_world_size(ep_group) == 1:
        return LocalDispatcher(num_experts)
    cls = DedupAllToAllDispatcher if dedup else AllToAllDispatcher
    return cls(num_experts, ep_group)
