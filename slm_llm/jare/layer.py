"""The JARe linear: a frozen base linear plus per-task low-rank slots mixed per sample.

    y = W x + scale * sum_k w[b, k] * B_{s[b, k]} (A_{s[b, k]} x)

Slot ids ``s`` and weights ``w`` (both [batch, K]) arrive as a :class:`Routing`, set on
the layer by :class:`slm_llm.jare.model.JareModel`, so one forward can mix tasks and a
KV-cached generation keeps its routing for every decode step.

The math, for training and inference alike: with U the L slots the routing uses (an
append-only :class:`SlotOrder`) and the per-row mask ``m[b, l] = scale * Σ_k w[b, k]
[s[b, k] = U_l]``,

    y = W x + ((x A_U^T) ⊙ m_b) B_U^T        A_U: [L*r, in], B_U^T: [L*r, out]

Two shared-weight matmuls whatever the mix of tasks in the batch; the dense increment
``B A`` is never formed. Cost O(tokens * L * r * (in + out)), L <= min(slots loaded, batch * K).

Inference packs: layers that read the same input (q/k/v, gate/up; a lone layer is its own
pack) share one weight buffer, ``[W_1; ...; W_n; A rows of U]``, whose first rows ARE the
members' base weights (their ``base.weight`` become views of it). A pack costs one
``linear`` (every member's base output and ``x A_U^T`` together), one mask multiply and
one ``addmm`` per member (``B_U^T``, adding onto the base output), where the unpacked
layers cost a linear and two matmuls each. This is vLLM's packed qkv/gate-up LoRA, on
the routed slots.

The layer knows the math only; which slots a query gets is the router's business.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SlotOrder:
    """The slots a model's packs hold, in buffer order. Append-only until ``reset``, so a
    routing whose slots are already held (a prefill of rows about to join a decode batch,
    a row leaving) costs no buffer writes."""

    def __init__(self):
        self.slots: list[int] = []
        self.epoch = 0  # bumped by reset: packs rewrite their slot rows
        self.version = -1  # of the slot parameters the held rows were copied from

    def reset(self) -> None:
        self.slots, self.epoch = [], self.epoch + 1

    def track(self, params) -> None:
        """Reset when any slot parameter changed in place since the rows were copied (a training step)."""
        version = sum(p._version for p in params)
        if version != self.version:
            self.reset()
            self.version = version


class Routing:
    """A batch's routing for every layer of a model: ``slot_ids``/``slot_weights`` [B, K] and
    the per-row mask over the first L slots of ``order`` (zero-weight slots are not held)."""

    def __init__(self, slot_ids: torch.Tensor, slot_weights: torch.Tensor, scale: float, order: SlotOrder):
        self.slot_ids, self.slot_weights, self.order = slot_ids, slot_weights, order
        ids, w = slot_ids.cpu(), slot_weights.detach().float().cpu() * scale  # [B, K]
        position = {s: i for i, s in enumerate(order.slots)}
        for s in sorted(set(ids[w != 0].tolist()) - set(position)):
            position[s] = len(order.slots)
            order.slots.append(s)
        self.L = len(order.slots)
        mask = torch.zeros(ids.shape[0], self.L)  # [B, L]
        live = w != 0
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)[live]
        cols = torch.tensor([position[s] for s in ids[live].tolist()], dtype=torch.long)
        mask.index_put_((rows, cols), w[live], accumulate=True)  # a slot listed twice adds up
        self.mask = mask.to(slot_weights.device)
        self._expanded: dict[tuple, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def expanded(self, rank: int, dtype: torch.dtype, members: int = 1, dims: int = 2) -> torch.Tensor:
        """Each slot's weight repeated over its ``rank`` rows (slot-major), tiled ``members``
        times (member-major), shaped [B, 1.., members * L * rank] to broadcast over ``dims``-D inputs."""
        key = (rank, dtype, members, dims)
        if key not in self._expanded:
            mask = self.mask.repeat_interleave(rank, dim=1).repeat(1, members).to(dtype)
            self._expanded[key] = mask.view(mask.shape[0], *([1] * (dims - 2)), mask.shape[1])
        return self._expanded[key]


class JareLinear(nn.Module):
    """Wraps ``base`` (kept frozen) with task-owned slots.

    Each task ``t`` registers two parameters directly on this module, ``A_t``
    [P, r, in] and ``B_t`` [P, out, r]; registering them directly (not in a
    ParameterList) keeps them visible to ZeRO-3's per-module gather hooks.
    """

    def __init__(self, base: nn.Linear, rank: int, slots_per_task: int, scale: float = 1.0):
        super().__init__()
        self.base = base
        self.rank = rank
        self.slots_per_task = slots_per_task
        self.scale = scale
        self.task_names: list[str] = []
        self.routing: Routing | None = None  # set by JareModel (or set_routing); None -> base output only
        self.order = SlotOrder()  # replaced by the model's shared order
        self.pack = Pack([self])  # replaced by the model when siblings share this layer's input

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_task(self, name: str) -> None:
        """Create ``name``'s P slots with B = 0, so the increment starts at exactly zero."""
        P, r = self.slots_per_task, self.rank
        w = self.base.weight
        A = torch.empty(P, r, self.in_features, dtype=torch.float32, device=w.device)
        for p in range(P):  # same init as nn.Linear / PEFT LoRA A
            nn.init.kaiming_uniform_(A[p], a=math.sqrt(5))
        B = torch.zeros(P, self.out_features, r, dtype=torch.float32, device=w.device)
        idx = len(self.task_names)
        self.register_parameter(f"A_{idx}", nn.Parameter(A.to(_param_dtype(w))))
        self.register_parameter(f"B_{idx}", nn.Parameter(B.to(_param_dtype(w))))
        self.task_names.append(name)

    def task_factors(self, idx: int) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"A_{idx}"), getattr(self, f"B_{idx}")

    def slot_factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of global slot ``slot``."""
        task, j = divmod(slot, self.slots_per_task)
        A, B = self.task_factors(task)
        return A[j], B[j]

    def set_routing(self, slot_ids: torch.Tensor | None, slot_weights: torch.Tensor | None) -> None:
        """Route this layer alone ([B, K] ids and weights; None = base only). JareModel routes all its layers at once."""
        if slot_ids is None:
            self.routing = None
            return
        self.order.track(self.parameters())
        self.routing = Routing(slot_ids, slot_weights, self.scale, self.order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing if self.task_names else None
        if routing is not None and routing.rows != x.shape[0]:
            raise RuntimeError(f"routing has {routing.rows} rows but the batch has {x.shape[0]}")
        if not torch.is_grad_enabled() and self.pack.packable():
            return self.pack.output(self, x, routing)
        y = self.base(x)
        if routing is None or routing.L == 0:
            return y
        A, B = zip(*(self.slot_factors(s) for s in routing.order.slots[: routing.L]))
        A_U = torch.cat(A).to(x.dtype)  # [L*r, in]
        Bt_U = torch.cat([b.T for b in B]).to(x.dtype)  # [L*r, out]
        h = (x @ A_U.T) * routing.expanded(self.rank, x.dtype, dims=x.dim())  # [.., L*r]
        return y + h @ Bt_U


class Pack:
    """Layers that read the same input, computed together at inference (see the module doc).

    The buffer holds the members' base weights (rows ``[0, O)``), then each member's A rows
    for the held slots, member-major (member i, slot l, rank k at ``O + (i*L + l)*r + k``);
    member i's ``B_U^T`` is its own [L*r, out_i] matrix. The first member called with a new
    input computes every member's output; the others take theirs (the input tensor's identity
    says it is the same input). Rebuilt when the members' weights move (``.to()``) or a task
    is added; the slot rows are rewritten when the held slots change.
    """

    def __init__(self, members: list[JareLinear]):
        self.members = members
        self.offsets, o = [], 0
        for m in members:
            self.offsets.append(o)
            o += m.out_features
        self.out = o  # O: rows of base weights at the top of the buffer
        self.spans = [(off, off + m.out_features) for off, m in zip(self.offsets, members)]
        for i, m in enumerate(members):
            m.pack_index = i
        self.weight: torch.Tensor | None = None  # [O + n*S*r, in]
        self.bias: torch.Tensor | None = None  # [O + n*S*r] (zeros below O), None if no member has a bias
        self.Bt: list[torch.Tensor] = []  # per member [S*r, out_i]
        self._views: list[int] = []  # data_ptr of each member's base weight when built
        self._slots = -1  # S when built
        self._held = (-1, 0)  # (SlotOrder epoch, L) the slot rows were written for
        self._live: tuple = ()  # (weight rows, bias rows, B_U^T per member) for the held slots
        self._x: torch.Tensor | None = None
        self._ys: list[torch.Tensor] | None = None
        self._taken: set[int] = set()

    def packable(self) -> bool:
        """A float base in every member, not partitioned by ZeRO-3 (whose hooks own the weights)."""
        return all(m.base.weight.dtype.is_floating_point and not hasattr(m.base.weight, "ds_id")
                   for m in self.members)

    def output(self, layer: JareLinear, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        i = layer.pack_index
        if self._x is not x or i in self._taken:
            self._x, self._ys, self._taken = x, self._forward(x, routing), set()
        y = self._ys[i]
        self._taken.add(i)
        if len(self._taken) == len(self.members):  # every member has its output: hold nothing
            self._x = self._ys = None
        return y

    def _forward(self, x: torch.Tensor, routing: Routing | None) -> list[torch.Tensor]:
        self._sync(routing)
        weight, bias, Bts = self._live
        out = F.linear(x, weight, bias)  # [.., O + n*L*r]: base outputs, then x A_U^T per member
        if not Bts:
            return [out[..., a:b] for a, b in self.spans]
        n, rank = len(self.members), self.members[0].rank
        Lr = Bts[0].shape[0]
        h = (out[..., self.out:] * routing.expanded(rank, x.dtype, n, x.dim())).view(-1, n * Lr)  # weighted per row
        flat = out.view(-1, out.shape[-1])
        return [torch.addmm(flat[:, a:b], h[:, i * Lr:(i + 1) * Lr], Bt).view(*x.shape[:-1], b - a)
                for i, ((a, b), Bt) in enumerate(zip(self.spans, Bts))]

    def _sync(self, routing: Routing | None) -> None:
        """(Re)build the buffer if needed, then write the held slots' rows if they changed."""
        m0 = self.members[0]
        slots = len(m0.task_names) * m0.slots_per_task
        if slots != self._slots or [m.base.weight.data_ptr() for m in self.members] != self._views:
            self._build(slots)
        held = (routing.order.epoch, routing.L) if routing is not None and routing.L else (-1, 0)
        if held == self._held:
            return
        r, L = m0.rank, held[1]
        with torch.no_grad():
            for i, (m, Bt) in enumerate(zip(self.members, self.Bt)):
                if not L:
                    break
                A, B = zip(*(m.slot_factors(s) for s in routing.order.slots[:L]))  # L x [r, in], L x [out_i, r]
                start = self.out + i * L * r
                self.weight[start: start + L * r] = torch.cat(A)
                Bt[: L * r] = torch.cat([b.T for b in B])
        rows = self.out + len(self.members) * L * r
        self._live = (self.weight[:rows], None if self.bias is None else self.bias[:rows],
                      [Bt[: L * r] for Bt in self.Bt] if L else [])
        self._held = held

    def _build(self, slots: int) -> None:
        m0 = self.members[0]
        w0 = m0.base.weight
        extra = slots * len(self.members) * m0.rank
        with torch.no_grad():
            weight = torch.empty(self.out + extra, m0.in_features, dtype=w0.dtype, device=w0.device)
            weight[: self.out] = torch.cat([m.base.weight for m in self.members])
            bias = None
            if any(m.base.bias is not None for m in self.members):
                bias = torch.zeros(self.out + extra, dtype=w0.dtype, device=w0.device)
            for m, off in zip(self.members, self.offsets):
                m.base.weight.data = weight[off: off + m.out_features]
                if bias is not None and m.base.bias is not None:
                    bias[off: off + m.out_features] = m.base.bias
                    m.base.bias.data = bias[off: off + m.out_features]
        self.weight, self.bias = weight, bias
        self.Bt = [torch.empty(slots * m0.rank, m.out_features, dtype=w0.dtype, device=w0.device) for m in self.members]
        self._views = [m.base.weight.data_ptr() for m in self.members]
        self._slots, self._held = slots, (-2, 0)
        self._x = self._ys = None


def _param_dtype(w: torch.Tensor) -> torch.dtype:
    # A 4-bit base keeps uint8 storage; slots train in fp32 there.
    return w.dtype if w.dtype.is_floating_point else torch.float32
