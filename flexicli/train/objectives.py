"""What training optimises: distillation against the original model (ours) or FlexiDepth's LM objective, and the
statistics of the routers' gates that the budgets (flexicli/train/budget.py) and the margin work on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# Full-vocabulary logits are the biggest tensors of a step (SmolLM2: 49152 floats a token, Llama-3: 128256), and
# the loss holds about six of them per token at once: chunks of tokens keep each under this many bytes whatever the
# vocabulary. (On SmolLM2 at batch 4 x 256 this measured the same peak RSS as the former fixed 512-token chunks.)
CHUNK_BYTES = 32 * 2**20


def logits_fn(model):
    """hidden (after the final norm) -> logits, including Gemma-2's final soft-capping. `fn.chunk`: tokens per
    loss chunk (CHUNK_BYTES of float32 logits)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def fn(h):
        logits = head(h).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    fn.chunk = max(16, CHUNK_BYTES // (4 * head.weight.shape[0]))
    # what the fused KL (_FusedKL) needs for the gradient through these logits: the head, if a Linear (every
    # family's), whose weight takes it back to the hidden states, and the soft-cap, whose tanh it passes through
    fn.linear, fn.cap = (head if isinstance(head, torch.nn.Linear) else None), cap
    return fn


def _short_lead(z, top, match, lead: float) -> torch.Tensor:
    """Rows whose logits `z` do not lead with `top` by at least `lead` (nats) over the next token: the misses (~match:
    z's top token is not `top`), and with lead > 0 also the matches by less (top1_lead in distill_loss). At lead 0 no
    vocabulary-wide pass beyond the argmax behind `match`."""
    if not lead:
        return ~match
    v, i = z.topk(2, dim=-1)
    runner_up = torch.where(i[:, 0] == top, v[:, 1], v[:, 0])  # a miss: top's logit minus the top one's, <= 0
    return z.gather(-1, top[:, None]).squeeze(-1) - runner_up < lead


def _kl_chunk(s_h, t_h, head, w=None, top1_weight=0.0, top1_lead=0.0):
    s = F.log_softmax(head(s_h), dim=-1)
    with torch.no_grad():
        t = F.log_softmax(head(t_h), dim=-1)
        top = t.argmax(-1)
        match = s.argmax(-1) == top
        agree = match.sum()
        miss = _short_lead(s, top, match, top1_lead)
    kl = (t.exp() * (t - s)).sum(-1)
    if top1_weight:  # see distill_loss
        kl = kl - top1_weight * miss * s.gather(-1, top[:, None]).squeeze(-1)
    return (kl if w is None else kl * w).sum(), agree


class _FusedKL(torch.autograd.Function):
    """Mean KL(teacher || student) over tokens [N, hidden] (weighted by `w` [N] if given) and the top-1 agreement, with
    the gradient for the student's hidden states computed in the same pass over token chunks: d KL / d logits =
    softmax(s) - softmax(t) (times 1 - tanh^2 under soft-capping), then through the frozen head once. Checkpointed
    autograd instead applies the head five times a chunk (teacher and student in forward, both again in the recompute,
    the student's backward) and takes each log-softmax twice: measured on SmolLM2's head (49152 x 576) at 1024 tokens, 1
    CPU thread, the loss with its backward took 5.2 s against 8.8 s, about a third of a training step."""

    @staticmethod
    def forward(ctx, s, t, head, chunk, w, top1_weight, top1_lead):
        weight, cap = head.linear.weight, head.cap
        grad = torch.empty_like(s)
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        agree = torch.zeros((), dtype=torch.long, device=s.device)
        for i in range(0, s.shape[0], chunk):
            zs, zt = head(s[i:i + chunk]), head(t[i:i + chunk])  # logits_fn's: float32, soft-capped
            top = zt.argmax(-1)
            match = zs.argmax(-1) == top
            agree += match.sum()
            # rows whose top token differs (or leads by less than top1_lead)
            miss = _short_lead(zs, top, match, top1_lead).nonzero().squeeze(-1) if top1_weight else None
            t_lp = F.log_softmax(zt, dim=-1)
            del zt  # in place from here on: a chunk holds at most four vocabulary-wide tensors
            p = t_lp.exp()
            s_lp = F.log_softmax(zs, dim=-1)
            ce = -s_lp[miss, top[miss]] if top1_weight else None  # before s_lp turns into probabilities
            kl = t_lp.sub_(s_lp).mul_(p).sum(-1)
            del t_lp
            g = s_lp.exp_().sub_(p)  # d sum(KL) / d (capped) logits
            if top1_weight and miss.numel():  # + top1_weight * CE toward the original's top token, on the misses
                g_ce = g[miss] + p[miss]  # the routed probabilities
                g_ce[torch.arange(miss.numel(), device=g.device), top[miss]] -= 1
                g[miss] += top1_weight * g_ce
                kl[miss] += top1_weight * ce
            if cap:
                g *= 1 - (zs / cap).square()
            del zs, p
            if w is not None:
                kl, g = kl * w[i:i + chunk], g.mul_(w[i:i + chunk, None])
            total += kl.sum()
            grad[i:i + chunk] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        n = s.shape[0]
        agree = agree.float() / n
        ctx.mark_non_differentiable(agree)
        ctx.norm = n if w is None else w.sum().item()
        return total / ctx.norm, agree

    @staticmethod
    def backward(ctx, grad_loss, grad_agree):
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss / ctx.norm).to(grad.dtype), None, None, None, None, None, None


def distill_loss(student_h, teacher_h, head, chunk: int | None = None, weights: torch.Tensor | None = None,
                 top1_weight: float = 0.0, top1_lead: float = 0.0):
    """Mean KL(teacher || student) per token and the top-1 agreement, computed over token chunks, so full-vocabulary
    logits of the whole batch never sit in memory at once: fused with its gradient (_FusedKL) when the head is a
    frozen Linear, else with checkpointing. `weights` (shaped like the tokens, e.g. answer_weights'): a weighted mean
    of the per-token KL instead (the agreement stays a plain share). `top1_weight` > 0: each token whose top-1 differs
    from the teacher's adds top1_weight * its cross-entropy toward the teacher's top token (the loss is then no longer
    the KL alone). Why: flexi eval's top-1 agreement counts flips the KL barely sees (near-ties in the teacher).
    `top1_lead` > 0: the term also applies where the student picks the teacher's top token but leads with it by less
    than top1_lead (logit gap to its next token, nats): a match by a hair on training text is a likely miss on new text."""
    s, t = student_h.reshape(-1, student_h.shape[-1]), teacher_h.reshape(-1, teacher_h.shape[-1])
    w = weights.reshape(-1).to(device=s.device, dtype=torch.float32) if weights is not None else None
    if w is not None and w.shape[0] != s.shape[0]:
        raise RuntimeError(f"distill_loss: {w.shape[0]} token weights for {s.shape[0]} tokens")
    total, agree, chunk = 0.0, 0, chunk or getattr(head, "chunk", 512)
    linear = getattr(head, "linear", None)
    if s.requires_grad and linear is not None and not any(p.requires_grad for p in linear.parameters()):
        return _FusedKL.apply(s, t.detach(), head, chunk, w, top1_weight, top1_lead)
    for i in range(0, s.shape[0], chunk):
        wi = w[i:i + chunk] if w is not None else None
        if s.requires_grad:
            kl, a = checkpoint(_kl_chunk, s[i:i + chunk], t[i:i + chunk], head, wi, top1_weight, top1_lead,
                               use_reentrant=False)
        else:
            kl, a = _kl_chunk(s[i:i + chunk], t[i:i + chunk], head, wi, top1_weight, top1_lead)
        total, agree = total + kl, agree + a
    return total / (s.shape[0] if w is None else w.sum()), agree.float() / s.shape[0]


def answer_weights(ids: torch.Tensor, header: list[int], ends: set[int], weight: float,
                   decay: float = 0.5) -> torch.Tensor:
    """Per position of token rows [B, T], the KL's weight: 1, plus `weight * decay**k` at the position that predicts
    the k-th token of an assistant answer (k = 0: the last token of the answer `header`, which predicts the first
    answer token). An answer runs from its header to the next id in `ends` (end of turn, EOS). Why: `flexi eval`'s
    task answers are short, their first tokens decide them, and those are where the routed model flips most."""
    B, T = ids.shape
    w = torch.ones(B, T)
    if weight <= 0:
        return w
    n, rows = len(header), ids.tolist()
    for b, row in enumerate(rows):
        k = None  # answer position index while inside an answer
        for i, tok in enumerate(row):
            if k is None and i + 1 >= n and row[i + 1 - n:i + 1] == header:
                k = 0
            elif k is not None and tok in ends:
                k = None
            if k is not None:
                w[b, i] += weight * decay ** k
                k += 1
    return w


def hidden_loss(student: list[torch.Tensor], teacher) -> torch.Tensor:
    """The per-layer hidden-state term: over the routed layers and tokens, the mean of ||s - t||^2 / ||t||^2 between
    the student's and the teacher's hidden state leaving each routed layer (teacher: a list or a stacked [layers, ...]
    tensor in the same order). Relative, so layers and tokens whose residual stream is far larger (the first token's)
    do not outweigh the rest."""
    if len(student) != len(teacher):
        raise RuntimeError(f"hidden-state term: {len(student)} student layers against {len(teacher)} teacher layers")
    terms = [(s.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1).clamp_min(1e-6)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def _ce_chunk(h, targets, head):
    return F.cross_entropy(head(h), targets, reduction="sum")


def lm_loss(student_h, input_ids, head, chunk: int | None = None):
    """Next-token cross-entropy (FlexiDepth's objective), chunked like distill_loss."""
    h = student_h[:, :-1].reshape(-1, student_h.shape[-1])
    y = input_ids[:, 1:].reshape(-1)
    total, chunk = 0.0, chunk or getattr(head, "chunk", 512)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_chunk, h[i:i + chunk], y[i:i + chunk], head, use_reentrant=False)
    return total / h.shape[0]


def gate_stats(gates):
    """From RoutingState.gates [(unit, w, run, cost)]: per token the straight-through count of skipped layers, in
    layer-equivalents (each skipped unit counts its cost, flexicli/core/units.py; 1 per layer for skip unit `layer`;
    forward value = hard count, gradient through w), the soft sum of gates, and the hard per-unit skip rates."""
    w = torch.stack([g[1] for g in gates], dim=-1)  # [B, T, U]
    run = torch.stack([g[2] for g in gates], dim=-1).to(w.dtype)
    skipped = 1 - (run + w - w.detach())
    costs = [g[3] if len(g) > 3 else 1.0 for g in gates]
    if any(c != 1.0 for c in costs):
        skipped = skipped * torch.tensor(costs, dtype=w.dtype, device=w.device)
    return skipped.sum(-1), w.sum(-1), 1 - run.mean(dim=(0, 1))


def row_spread(skipped_st: torch.Tensor) -> torch.Tensor:
    """The variance over a micro-batch's rows of each row's mean skipped count (layer-equivalents, straight-through:
    gate_stats' per-token count [B, T]). Its gradient sums to zero over the rows, so it leaves the mean count to the
    budget and moves skips from rows that skip more to rows that skip less. Why: the penalty sees only the batch
    mean, so the routers are free to spend the budget on one kind of text; at N = 8 they skipped 7.96 layers on
    held-out conversations and 6.20 on package documentation (docs/results.md), which no threshold fixes."""
    rows = skipped_st.float().mean(dim=1)
    return (rows - rows.mean()).pow(2).mean()


def source_spread(skipped_st: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The variance between the data sources of a micro-batch's rows (source [B]: 0 conversations, 1 documentation,
    loop.training_data) of each row's mean skipped count: every row counts with its own source's mean. Like
    row_spread, its gradient sums to zero over the rows (mean-neutral: the budget keeps the mean), but it moves skips
    only between kinds of text and leaves each kind free to spend them where they cost least. Why: row_spread held
    the budget on docstrings at N = 8 (7.85 of 8) and took task retention from 0.934 to 0.619 (docs/results.md): it
    asked a hard row (a sum, an exact copy) to skip as much as an easy one. 0 when the micro-batch has one source."""
    rows = skipped_st.float().mean(dim=1)
    source = source.to(rows.device)
    group = torch.zeros_like(rows)
    for kind, mean in source_means(rows, source).items():
        group = torch.where(source == kind, mean, group)
    return (group - rows.mean()).pow(2).mean()


def source_means(rows: torch.Tensor, source: torch.Tensor) -> dict[int, torch.Tensor]:
    """{source: the mean of `rows` ([B], e.g. each row's skipped count) over that source's rows}, for the sources
    present in `source` ([B])."""
    source = source.to(rows.device)
    return {int(kind): rows[source == kind].mean() for kind in source.unique()}


def unit_density(gates) -> torch.Tensor:
    """[U]: each routed unit's share of tokens that run it, straight-through (forward value = the hard share,
    gradient through w): what BudgetDensity pulls toward its target density."""
    w = torch.stack([g[1] for g in gates], dim=-1)
    run = torch.stack([g[2] for g in gates], dim=-1).to(w.dtype)
    return (run + w - w.detach()).mean(dim=(0, 1))


# The cap's weight per unit of excess share: ~7x the penalty's balance multiplier (0.06-0.15 on SmolLM2, loop.
# penalty_balance), so a capped unit's tokens return to running while the penalty moves the skips elsewhere.
SKIP_CAP_WEIGHT = 1.0


def skip_cap_loss(density: torch.Tensor, max_share: float) -> torch.Tensor:
    """A hinge on each unit's share of tokens that skip it (1 - density, straight-through) above `max_share`."""
    return SKIP_CAP_WEIGHT * torch.relu(1 - density - max_share).sum()


def gate_margin(gates, center: float, width: float = 1.0) -> torch.Tensor:
    """Per token, summed over routed layers: how far a gate sits on the wrong side of `center +- width` (in logit
    space) for its decision: a running token's logit should be above center + width, a skipping token's below
    center - width. With threshold decisions (run iff logit > center) that is plain distance to the threshold.
    Why: with straight-through decisions the threshold attracts gates (the budget pushes every gate down, the KL
    pushes a gate back up only once its token skips), so they bunch there and a small shift flips many tokens at
    once; and with per-layer capacities (decisions by rank) it makes the one threshold used at inference (`center`)
    reproduce the decisions made in training."""
    w = torch.stack([g[1] for g in gates], dim=-1).float()
    side = torch.stack([g[2] for g in gates], dim=-1).float() * 2 - 1
    return torch.relu(width - side * (torch.logit(w, eps=1e-6) - center)).sum(-1)


def gate_logits(gates) -> torch.Tensor:
    """The routers' logits of one forward, pooled over tokens and routed layers (for the budget threshold)."""
    w = torch.stack([g[1].detach().float() for g in gates], dim=-1)
    return torch.logit(w, eps=1e-7).flatten()
