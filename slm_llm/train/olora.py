"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Each task trains a new LoRA while every earlier task's LoRA stays frozen and applied at
weight 1, and the loss keeps the new LoRA's input subspace orthogonal to the old ones:

    loss = LM loss + λ1 Σ_layers |A_new A_old^T|_1 + λ2 Σ_layers (‖A_new‖_F + ‖B_new‖_F)

``A_old`` [S, in] stacks every earlier task's A of the layer, ``|.|_1`` sums the absolute
entries. This is O-LoRA's own ``training_step`` (cmnfriend/O-LoRA, src/uie_trainer_lora.py):
``torch.abs(torch.mm(lora_A, loranew_A.T)).sum()`` per target module, and ``torch.norm(p, 2)``
(not squared) of every ``loranew_A`` and ``loranew_B``; λ1 = ``train.olora_lambda`` and
λ2 = ``train.olora_l2`` default to their ``lamda_1 = 0.5``, ``lamda_2 = 0`` (src/run_uie_lora.py).

Inference needs no task id: every query gets the sum of all tasks' LoRAs. In this harness a
task's LoRA is a one-slot JARe task of rank P*r (``shared_adapter_config``, the trainable size
of the other baselines and of one slm task), and the model is "every slot at weight 1", in
training (``all_tasks_routing`` in the driver) and at inference (``RunPipeline.route_records``).
The exported adapter concatenates the tasks' factors (rank T*P*r; ``export_olora_adapter``).

ZeRO-3 partitions every parameter, the frozen old tasks' included, and gathers a layer's
parameters only while that layer runs. So the old A's are copied once, before the engine
exists, as plain buffers (they are frozen: the copy is exact, costs no step-time gather, and
stays out of checkpoints), and the new LoRA's terms are computed in a forward hook on each
layer, where ZeRO-3 has its parameters gathered; the hook works on fresh copies, so the
backward never reads a parameter after ZeRO-3 has released it.
"""
from __future__ import annotations

import torch
from torch import nn

from slm_llm.config import Config, TrainConfig, shared_adapter_config
from slm_llm.jare import JareModel
from slm_llm.models import load_base_model
from slm_llm.run import RunDir


def orthogonality_loss(A_new: torch.Tensor, A_old: torch.Tensor) -> torch.Tensor:
    """Σ |A_new A_old^T| over all entries; A_new [R, in], A_old [S, in] (S may be 0)."""
    return (A_new @ A_old.T).abs().sum()


def l2_loss(A_new: torch.Tensor, B_new: torch.Tensor) -> torch.Tensor:
    """O-LoRA's L2 term for one layer: ‖A_new‖_F + ‖B_new‖_F (norms, not squares)."""
    return torch.linalg.vector_norm(A_new) + torch.linalg.vector_norm(B_new)


def olora_model(cfg: Config, run: RunDir, done: list[str], new: str, seed: int) -> JareModel:
    """Base + every finished task's LoRA (frozen, loaded from its increments) + ``new``'s LoRA
    (trainable, seeded so every rank and world size starts from the same init)."""
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, shared_adapter_config(cfg.jare))
    for task in done:
        model.load_task(task, run.task_dir(task) / "increments.safetensors")
    torch.manual_seed(seed)
    model.add_task(new)
    return model


class OLoraObjective(nn.Module):
    """The model the engine trains: ``model``'s LM loss plus O-LoRA's terms on its newest task.

    Build it before the DeepSpeed engine (the old A's are copied here, and the hooks must run
    before ZeRO-3's own post-forward hook releases a layer's parameters). The returned loss
    (and so ``train_log.jsonl``'s ``loss``) includes the regularisers.
    """

    def __init__(self, model: JareModel, train: TrainConfig):
        super().__init__()
        self.jare = model
        self.lam, self.l2 = train.olora_lambda, train.olora_l2
        self.new = len(model.tasks) - 1
        layers = model.jare_layers()
        for i, layer in enumerate(layers):
            old = [layer.task_factors(k)[0].detach().flatten(0, 1) for k in range(self.new)]  # [R, in] each
            old_A = torch.cat(old) if old else torch.zeros(0, layer.in_features)  # [S, in]
            self.register_buffer(f"old_A_{i}", old_A.float().clone(), persistent=False)
        self._terms: dict[int, torch.Tensor] = {}
        self._hooks = [layer.register_forward_hook(self._layer_terms_hook(i)) for i, layer in enumerate(layers)]

    def _layer_terms_hook(self, i: int):
        def hook(layer, _args, _output):
            if not torch.is_grad_enabled():
                return
            A, B = layer.task_factors(self.new)  # [1, R, in], [1, out, R]
            A = A.flatten(0, 1).to(torch.float32, copy=True)  # [R, in], a fresh copy (ZeRO-3, see above)
            term = A.new_zeros(())
            if self.lam:
                term = term + self.lam * orthogonality_loss(A, self.get_buffer(f"old_A_{i}").to(A.device))
            if self.l2:
                term = term + self.l2 * l2_loss(A, B.flatten(0, 1).to(torch.float32, copy=True))
            self._terms[i] = term  # a recomputation (gradient checkpointing) overwrites, never adds
        return hook

    def forward(self, input_ids, attention_mask=None, labels=None, slot_ids=None, slot_weights=None):
        self._terms.clear()
        out = self.jare(input_ids, attention_mask, labels, slot_ids, slot_weights)
        if labels is None:
            return out
        if len(self._terms) != len(self._hooks):
            raise RuntimeError(f"O-LoRA terms came from {len(self._terms)} of {len(self._hooks)} layers")
        return out + sum(self._terms.values()).to(out.dtype)
