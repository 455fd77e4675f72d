"""The JARe linear: a frozen base linear plus per-task low-rank slots mixed per sample.

    y = W x + scale * sum_k w[b, k] * B_{s[b, k]} (A_{s[b, k]} x)

Slot ids ``s`` and weights ``w`` (both [batch, K]) come from the routing context
set on the layer by :class:`slm_llm.jare.model.JareModel`, so one forward can mix
tasks and a KV-cached generation keeps its routing for every decode step. The
dense increment ``B A`` is never formed: the cost is O(tokens * K * r * (in + out)).

The layer knows the math only; which slots a query gets is the router's business.
"""
from __future__ import annotations

import math

import torch
from torch import nn


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
        # Routing, set by JareModel; None -> base output only.
        self.slot_ids: torch.Tensor | None = None  # [B, K] global slot ids
        self.slot_weights: torch.Tensor | None = None  # [B, K]
        self._routed: tuple[torch.Tensor, torch.Tensor] | None = None  # inference cache of the routed factors

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

    def set_routing(self, slot_ids: torch.Tensor | None, slot_weights: torch.Tensor | None) -> None:
        self.slot_ids, self.slot_weights = slot_ids, slot_weights
        self._routed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.slot_ids is None or not self.task_names:
            return y
        if self.slot_ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"routing has {self.slot_ids.shape[0]} rows but the batch has {x.shape[0]}")
        A, B = self._routed or self._routed_factors(x.dtype)
        if not torch.is_grad_enabled():  # inference: reuse for every decode step of this routing
            self._routed = (A, B)
        return y + (x @ A) @ B  # [B,T,in] -> [B,T,K*r] -> [B,T,out]

    def _routed_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's K slots stacked along the rank axis, weights folded into B.

        Returns A^T [B, in, K*r] and B^T [B, K*r, out], contiguous, so the increment is
        two batched matmuls whatever the mix of tasks in the batch.
        """
        s, w = self.slot_ids, self.slot_weights  # [B, K]
        n = len(self.task_names)
        A_all = torch.cat([getattr(self, f"A_{i}") for i in range(n)])  # [S, r, in]
        B_all = torch.cat([getattr(self, f"B_{i}") for i in range(n)])  # [S, out, r]
        A = A_all[s].flatten(1, 2)  # [B, K*r, in]
        B = B_all[s] * (self.scale * w.to(B_all.dtype))[:, :, None, None]  # [B, K, out, r]
        B = B.permute(0, 2, 1, 3).flatten(2)  # [B, out, K*r]
        return A.transpose(1, 2).contiguous().to(dtype), B.transpose(1, 2).contiguous().to(dtype)


def _param_dtype(w: torch.Tensor) -> torch.dtype:
    # A 4-bit base keeps uint8 storage; slots train in fp32 there.
    return w.dtype if w.dtype.is_floating_point else torch.float32
