"""JareModel: inject JARe layers into a causal LM, add tasks, freeze old ones, route per sample.

Global slot ids are assigned in task order: task ``t`` owns ``t*P .. t*P+P-1``. The
same numbering is used by the DTKR router, so a routing decision indexes slots here
directly.

Targets that read the same input (``PACKED``: q/k/v, gate/up, as vLLM's
``packed_modules_mapping``) share one :class:`~slm_llm.jare.layer.Pack` at inference.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slm_llm.config import JareConfig
from slm_llm.jare.layer import JareLinear, Pack, Routing, SlotOrder
from slm_llm.utils.io import atomic_path

PACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class JareModel(nn.Module):
    def __init__(self, base: nn.Module, cfg: JareConfig):
        super().__init__()
        self.cfg = cfg
        self.model = base
        for p in base.parameters():
            p.requires_grad_(False)
        scale = cfg.alpha / cfg.rank if cfg.alpha else 1.0
        self.layer_names: list[str] = []
        for name, module in list(base.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in cfg.targets and isinstance(module, nn.Linear):
                parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
                setattr(parent, leaf, JareLinear(module, cfg.rank, cfg.slots_per_task, scale))
                self.layer_names.append(name)
        if not self.layer_names:
            raise ValueError(f"jare.targets {cfg.targets} matched no nn.Linear in {type(base).__name__}")
        self.tasks: list[str] = []
        self.scale = scale
        self.order = SlotOrder()  # one slot order for every pack, so one Routing serves every layer
        for layer in self.jare_layers():
            layer.order = self.order
        for parent in {name.rsplit(".", 1)[0] for name in self.layer_names if "." in name}:
            module = base.get_submodule(parent)
            for group in PACKED:
                members = [getattr(module, leaf) for leaf in group if isinstance(getattr(module, leaf, None), JareLinear)]
                if len(members) > 1:
                    pack = Pack(members)
                    for m in members:
                        m.pack = pack

    # ---- tasks -------------------------------------------------------------------
    def jare_layers(self) -> list[JareLinear]:
        return [self.model.get_submodule(n) for n in self.layer_names]

    def add_task(self, name: str) -> int:
        """Add ``name``'s slots (ΔW = 0), make them the only trainable tensors; return its index."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists")
        for layer in self.jare_layers():
            layer.add_task(name)
        self.tasks.append(name)
        self.freeze_all()
        for p in self.task_parameters(name):
            p.requires_grad_(True)
        return len(self.tasks) - 1

    def freeze_all(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        idx = self.tasks.index(name)
        return [p for layer in self.jare_layers() for p in layer.task_factors(idx)]

    def slot_range(self, name: str) -> range:
        P = self.cfg.slots_per_task
        idx = self.tasks.index(name)
        return range(idx * P, (idx + 1) * P)

    # ---- routing -----------------------------------------------------------------
    def set_routing(self, slot_ids: torch.Tensor | None, slot_weights: torch.Tensor | None) -> None:
        """Route every JARe layer with ``slot_ids``/``slot_weights`` ([B, K]); None = base only.

        Row b of the next forward uses row b of the routing: when rows join or leave a
        KV-cached batch, set the routing of the new row order before the next step. The
        packs keep the slots they hold until ``None`` is set, so a routing over slots already
        held (rows leaving, a prefill of rows about to join) writes nothing.
        """
        if slot_ids is not None:
            if slot_weights is None or slot_ids.shape != slot_weights.shape or slot_ids.dim() != 2:
                raise ValueError("slot_ids and slot_weights must both be [batch, K]")
            n = len(self.tasks) * self.cfg.slots_per_task
            if slot_ids.numel() and (int(slot_ids.min()) < 0 or int(slot_ids.max()) >= n):
                raise ValueError(f"slot id out of range [0, {n})")
            self.order.track(p for layer in self.jare_layers() for p in layer.parameters())
            routing = Routing(slot_ids, slot_weights, self.scale, self.order)
        else:
            routing = None
            self.order.reset()  # the next routing holds only its own slots
        for layer in self.jare_layers():
            layer.routing = routing

    @contextlib.contextmanager
    def routing(self, slot_ids: torch.Tensor | None, slot_weights: torch.Tensor | None):
        """Routing for the block only, so ``generate`` uses the same slots on every decode step."""
        self.set_routing(slot_ids, slot_weights)
        try:
            yield
        finally:
            self.set_routing(None, None)

    def forward(self, input_ids, attention_mask=None, labels=None, slot_ids=None, slot_weights=None):
        """Returns the mean token loss when ``labels`` are given, else the logits.

        The routing stays set after the call (until the next forward), because gradient
        checkpointing re-runs the layers' forwards during the backward pass.
        With labels, the LM head runs only on positions that carry loss: on instruction
        data most positions are prompt, and the head is a fifth of a small model's FLOPs.
        """
        self.set_routing(slot_ids, slot_weights)
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return lm_loss(hidden, labels, self.model.get_output_embeddings())

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, slot_ids=None, slot_weights=None, **kwargs):
        with self.routing(slot_ids, slot_weights):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ---- persistence ---------------------------------------------------------------
    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """``{"<layer>.A": [P, r, in], "<layer>.B": [P, out, r]}`` for one task, fp32, on CPU."""
        idx = self.tasks.index(name)
        out = {}
        for lname, layer in zip(self.layer_names, self.jare_layers()):
            A, B = layer.task_factors(idx)
            out[f"{lname}.A"] = A.detach().float().cpu().contiguous()
            out[f"{lname}.B"] = B.detach().float().cpu().contiguous()
        return out

    def load_task_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        idx = self.tasks.index(name)
        expected = {f"{n}.{f}" for n in self.layer_names for f in "AB"}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"increments for {name!r} do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for lname, layer in zip(self.layer_names, self.jare_layers()):
                for tensor, key in zip(layer.task_factors(idx), "AB"):
                    src = state[f"{lname}.{key}"]
                    if src.shape != tensor.shape:
                        raise ValueError(f"{lname}.{key}: shape {tuple(src.shape)} != {tuple(tensor.shape)}")
                    tensor.copy_(src.to(tensor.dtype))

    def save_task(self, name: str, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file(self.task_state_dict(name), str(tmp), metadata={"task": name})

    def load_task(self, name: str, path: str | Path) -> None:
        """Add task ``name`` (if new) from ``increments.safetensors``, frozen."""
        if name not in self.tasks:
            self.add_task(name)
        self.load_task_state(name, load_file(str(path)))
        for p in self.task_parameters(name):
            p.requires_grad_(False)


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Next-token cross-entropy over positions whose target is not -100."""
    targets = labels[:, 1:]
    keep = targets != -100
    h = hidden[:, :-1][keep]  # [N, H]
    logits = head(h).float()
    return F.cross_entropy(logits, targets[keep])
