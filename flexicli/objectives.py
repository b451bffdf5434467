"""What training optimises: distillation against the original model (ours) or FlexiDepth's LM objective, and the
controller that makes the mean number of skipped layers hit its target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def logits_fn(model):
    """hidden (after the final norm) -> logits, including Gemma-2's final soft-capping."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def fn(h):
        logits = head(h).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    return fn


def _kl_chunk(s_h, t_h, head):
    s = F.log_softmax(head(s_h), dim=-1)
    with torch.no_grad():
        t = F.log_softmax(head(t_h), dim=-1)
        agree = (s.argmax(-1) == t.argmax(-1)).sum()
    return (t.exp() * (t - s)).sum(), agree


def distill_loss(student_h, teacher_h, head, chunk: int = 512):
    """Mean KL(teacher || student) per token and the top-1 agreement, computed over token chunks with
    checkpointing, so full-vocabulary logits of the whole batch never sit in memory at once."""
    s, t = student_h.reshape(-1, student_h.shape[-1]), teacher_h.reshape(-1, teacher_h.shape[-1])
    total, agree = 0.0, 0
    for i in range(0, s.shape[0], chunk):
        if s.requires_grad:
            kl, a = checkpoint(_kl_chunk, s[i:i + chunk], t[i:i + chunk], head, use_reentrant=False)
        else:
            kl, a = _kl_chunk(s[i:i + chunk], t[i:i + chunk], head)
        total, agree = total + kl, agree + a
    return total / s.shape[0], agree.float() / s.shape[0]


def _ce_chunk(h, targets, head):
    return F.cross_entropy(head(h), targets, reduction="sum")


def lm_loss(student_h, input_ids, head, chunk: int = 512):
    """Next-token cross-entropy (FlexiDepth's objective), chunked like distill_loss."""
    h = student_h[:, :-1].reshape(-1, student_h.shape[-1])
    y = input_ids[:, 1:].reshape(-1)
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_chunk, h[i:i + chunk], y[i:i + chunk], head, use_reentrant=False)
    return total / h.shape[0]


def gate_stats(gates):
    """From RoutingState.gates [(layer, w, run)]: per token the straight-through count of skipped layers (forward
    value = hard count, gradient through w), the soft sum of gates, and the hard per-layer skip rates."""
    w = torch.stack([g[1] for g in gates], dim=-1)  # [B, T, L]
    run = torch.stack([g[2] for g in gates], dim=-1).to(w.dtype)
    skipped_st = (1 - (run + w - w.detach())).sum(-1)
    return skipped_st, w.sum(-1), 1 - run.mean(dim=(0, 1))


class BudgetController:
    """Lagrange multiplier for `mean skipped layers == target`, updated by a PI rule each optimiser step.

    The loss gets `lam * (target - skipped)`: while too few layers are skipped lam grows and the routers are pushed
    to skip more; when too many are skipped lam turns negative and pushes back. The proportional part reacts at once,
    the integral part removes the steady-state error, so the budget is hit rather than hoped for."""

    def __init__(self, num_routed: int, ki: float = 0.2, kp: float = 0.5, lam: float = 0.0):
        self.num_routed, self.ki, self.kp, self.integral = num_routed, ki, kp, lam
        self.lam = lam

    def update(self, target: float, skipped: float) -> float:
        err = (target - skipped) / self.num_routed
        self.integral += self.ki * err
        self.lam = self.integral + self.kp * err
        return self.lam

    def state(self) -> dict:
        return {"integral": self.integral, "lam": self.lam}

    def load(self, d: dict) -> None:
        self.integral, self.lam = d["integral"], d["lam"]
