"""train: distil the routed model against the original model (routing off) under a layer budget.

    flexi train --skip-target 4                    # embedded SmolLM2 checkpoint in ./flexi-model
    flexi train --recipe smollm2-135m-cpu --skip-target 8

Top to bottom: setup (model, data, optimiser, budget, resume) -> loop -> held-out evaluation -> save.
Only router and adapter parameters train; the teacher is the same model with routing off, so no second copy of the
weights is held. Checkpoints are written atomically; a resumed run sees the same data order as an unbroken one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from ..core.checkpoint import kill_point
from ..core.errors import BadInput
from ..core.flexi_model import decoder_of
from ..core.routed_layer import threshold_logit
from .budget import BUDGETS
from .objectives import (answer_weights, distill_loss, gate_logits, gate_margin, gate_stats, hidden_loss, lm_loss,
                         logits_fn, row_spread, skip_cap_loss, source_means, source_spread,
                         unit_density)
from .calibration import calibrate_threshold, mean_skipped
from .config import TrainConfig
from .resume import METRICS, TRAIN_STATE, load_training, save_training, trim_metrics
from .teacher import cache_bytes

FACT_TOKENS = 24  # the original's answer to a fact prompt: a few words, then whatever it adds
CACHE_LIMIT = 4 * 2**30  # teacher cache bytes; memory is only touched for rows a run reaches (TeacherCache lazy)


# ---- data ---------------------------------------------------------------------------------------------------
def training_data(fm, cfg: TrainConfig, progress=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(training rows, validation rows or None, each training row's source or None). The source, for data mix only:
    0 for a conversation row, 1 for a documentation row (objectives.source_spread). Validation rows are the built-in
    validation prompts with the original model's answers, for data selfgen and mix (whose answers are generated
    anyway): disjoint from the training rows and from the held-out prompts that `flexi eval` and calibration use, so
    choosing the checkpoint on them does not bias the verdict."""
    from ..data import text

    validation = None
    if cfg.data in ("selfgen", "mix"):
        # answered together, in file order: the same prompt list (so the same answer cache) as before the split
        asked = text.builtin_prompts("train", "validation")
        validation_prompts = set(text.builtin_prompts("validation"))  # the built-in prompts are unique
        held = {i for i, p in enumerate(asked) if p in validation_prompts}
        docs_texts = text.package_docs(cfg.docs_chars) if cfg.data == "mix" or cfg.task_prompts else []
        asked += text.task_prompts(cfg.task_prompts, docs=docs_texts)
        answers = text.teacher_answers(fm, asked, cfg.selfgen_tokens, progress=progress)
        if cfg.fact_prompts:  # answered apart, short: the recall is in an answer's first tokens
            facts = text.fact_prompts(cfg.fact_prompts)
            asked, answers = asked + facts, answers + text.teacher_answers(fm, facts, FACT_TOKENS, progress=progress)
        texts = text.conversations(fm, [p for i, p in enumerate(asked) if i not in held],
                                   [a for i, a in enumerate(answers) if i not in held])
        try:  # read as the held-out text is: one conversation per row (text.one_per_row)
            validation = text.one_per_row(fm.tokenizer, text.conversations(fm, [asked[i] for i in sorted(held)],
                                                                            [answers[i] for i in sorted(held)]),
                                          cfg.seq_len)
        except BadInput:  # no validation text: train() says there are none
            validation = None
        if cfg.data == "mix":  # packed apart (no row straddles the two), the conversations repeated until they
            chat = text.pack(fm.tokenizer, texts, cfg.seq_len)  # are about half the rows: the held-out text and
            docs = text.pack(fm.tokenizer, docs_texts, cfg.seq_len)  # the chat template stay
            chat = chat.repeat(max(1, round(docs.shape[0] / chat.shape[0])), 1)
            source = torch.cat([torch.zeros(chat.shape[0], dtype=torch.long),
                                torch.ones(docs.shape[0], dtype=torch.long)])
            return torch.cat([chat, docs]), validation, source
    elif cfg.data == "docs":
        texts = text.package_docs(cfg.docs_chars)
    elif cfg.data == "prompts":
        texts = text.conversations(fm, text.builtin_prompts("train"), None)
    else:
        texts = text.read_data(cfg.data, fm.tokenizer)
    rows = text.pack(fm.tokenizer, texts, cfg.seq_len)
    vocab = fm.model.get_input_embeddings().num_embeddings
    if rows.max().item() >= vocab:  # token-id data (input_ids rows): an embedding lookup would fail mid-run
        raise BadInput(f"--data {cfg.data} has token id {rows.max().item()}, outside the model's vocabulary ({vocab})")
    return rows, validation, None


def training_rows(fm, cfg: TrainConfig, progress=None) -> torch.Tensor:
    return training_data(fm, cfg, progress)[0]


def heldout_rows(fm, seq_len: int, progress=None) -> torch.Tensor | None:
    """The held-out prompts with the original model's answers, one conversation per row as `flexi eval` reads them
    (text.one_per_row: right-padded with text.PAD); None for a model without a tokenizer (trained from token ids): no
    held-out text can be made for it, so the run has no held-out evaluation or calibration."""
    from ..data import text

    if fm.tokenizer is None:
        return None
    return text.one_per_row(fm.tokenizer, text.heldout_texts(fm, progress=progress), seq_len)


def batch_indices(n: int, seed: int, index: int, batch_size: int) -> torch.Tensor:
    """Rows of micro-batch number `index`: a pure function of (seed, index), so resuming replays the same order."""
    picks = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        picks.append(perm[pos].item())
    return torch.tensor(picks)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def rollback_factor(rollbacks: list[int]) -> float:
    """The learning rate's factor after the rollbacks at the steps in `rollbacks`: halved per rollback."""
    return 0.5 ** len(rollbacks)


def run_lr(step: int, cfg: TrainConfig, rollbacks: list[int]) -> float:
    """The adapters' learning rate at `step` (0-based) of a run that rolled back after the steps in `rollbacks`:
    rollback_factor's share, re-warmed over cfg.warmup steps from the last one (Adam starts afresh there)."""
    lr = lr_at(step, cfg) * rollback_factor(rollbacks)
    return lr * min(1.0, (step - rollbacks[-1] + 1) / max(1, cfg.warmup)) if rollbacks else lr


def ema_decay(step: int, ema: float) -> float:
    """The weight average's decay after step `step` (0-based, counted from the first step at the full skip target):
    the plain mean of every step so far until that mean's decay 1 - 1/(step + 1) reaches `ema`, then exponential, so
    the first steps' weights do not linger. Routers averaged over a ramping target would skip too little."""
    return min(ema, 1.0 - 1.0 / (step + 1))


# ---- one step -----------------------------------------------------------------------------------------------
def release_freed_memory() -> None:
    """Have glibc serve blocks over 64 KiB with mmap, so that memory a step frees goes back to the system. By
    default its mmap threshold grows with every large block freed (up to 32 MiB), after which a step's activations
    and loss chunks are carved from the heap and stay in the process when freed: measured on SmolLM2 at batch
    4 x 256 (benchmarks/train_memory.py), +0.6 GB of peak RSS that no live tensor accounted for."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; a fixed value also stops the growth
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def _forward(fm, batch, cfg: TrainConfig, head, target: float, budget, cached=None, source=None) -> dict:
    """The student's forward of one micro-batch and its loss terms (no backward). Sets fm.state.capacity, which the
    caller clears in a `finally` after backward (also when this raises): gradient checkpointing recomputes each layer
    in backward and must take the same decisions."""
    from .teacher import routed_outputs, start_at_first_routed

    decoder = decoder_of(fm.model)
    device = next(fm.model.parameters()).device
    batch = batch.to(device)
    hidden = cfg.objective == "kl" and cfg.hidden_weight > 0
    if cached is not None:
        prefix_h, teacher_h, *teacher_layers = cached
        if hidden and not teacher_layers:
            raise RuntimeError("hidden_weight > 0 needs a TeacherCache made with layers=True")
        teacher_layers = teacher_layers[0] if teacher_layers else None
    elif cfg.objective == "kl":
        with torch.no_grad(), fm.routing("full"), (routed_outputs(fm) if hidden else nullcontext([])) as got:
            teacher_h = decoder(input_ids=batch).last_hidden_state
        teacher_layers = list(got)
    fm.state.gates = []
    shares = budget.capacity(target) if cfg.objective == "kl" else None
    fm.state.capacity = dict(zip(fm.unit_keys, shares)) if shares is not None else None
    try:
        with fm.routing("routed"), (start_at_first_routed(fm, prefix_h) if cached is not None else nullcontext()), \
                (routed_outputs(fm) if hidden else nullcontext([])) as student_layers:
            student_h = decoder(input_ids=batch).last_hidden_state
        skipped_st, gate_sum, layer_skip = gate_stats(fm.state.gates)
        capped = cfg.max_skip_share < 1
        density = unit_density(fm.state.gates) if budget.kind == "density" or capped else None
        logits = gate_logits(fm.state.gates)
        margin = gate_margin(fm.state.gates, budget.logit).mean() if cfg.margin else 0.0
    finally:
        fm.state.gates = None
    if cfg.objective == "kl":
        weights = None
        if cfg.answer_weight > 0:
            from ..data.tokens import answer_header

            weights = answer_weights(batch.cpu(), *answer_header(fm.tokenizer), cfg.answer_weight)
        main, agree = distill_loss(student_h, teacher_h, head, weights=weights, top1_weight=cfg.top1,
                                   top1_lead=cfg.top1_lead)
        extra = budget.loss(target, skipped_st, density) + cfg.margin * margin
        if hidden:
            term = hidden_loss(student_layers, teacher_layers)
            extra = extra + cfg.hidden_weight * term
        if capped:
            extra = extra + skip_cap_loss(density, cfg.max_skip_share)
        if cfg.row_spread > 0:
            extra = extra + cfg.row_spread * row_spread(skipped_st)
        spread = cfg.resolved(has_source=source is not None).source_spread  # train_step called with the default
        if spread > 0 and source is not None:  # without sources (the penalty's balance) no term
            extra = extra + spread * source_spread(skipped_st, source)
    else:
        main, agree = lm_loss(student_h, batch, head), torch.tensor(float("nan"))
        extra = cfg.alpha * gate_sum.pow(2).mean()
    return {"main": main, "agree": agree, "extra": extra, "skipped_st": skipped_st, "layer_skip": layer_skip,
            "logits": logits, "hidden": term.item() if hidden else None}


def train_step(fm, batch, cfg: TrainConfig, head, target: float, budget, cached=None, source=None) -> dict:
    """One micro-batch: forward, loss, backward. `cached`: (hidden entering the first routed layer, teacher's final
    hidden) from a TeacherCache; without it the teacher and the student's unrouted layers are recomputed. `source`:
    the rows' data sources (source_spread)."""
    try:
        f = _forward(fm, batch, cfg, head, target, budget, cached, source)
        ((f["main"] + f["extra"]) / cfg.grad_accum).backward()
    finally:
        fm.state.capacity = None
    rows = f["skipped_st"].detach().float().mean(dim=1)  # each row's count: how far the rows' budgets spread
    return {"loss": f["main"].item(), "agree": f["agree"].item(), "skipped": f["skipped_st"].mean().item(),
            "row_std": rows.std(unbiased=False).item(),
            # per data source present in the micro-batch (data mix), its rows' mean count
            "by_source": {} if source is None else {k: m.item() for k, m in source_means(rows, source).items()},
            "layer_skip": f["layer_skip"].detach().cpu(), "logits": f["logits"], "hidden": f["hidden"]}


def penalty_balance(fm, batches: list, cfg: TrainConfig, head, target: float, budget, routers: list,
                    cached: list | None = None) -> float:
    """The Lagrange multiplier at which, on these micro-batches, the distillation loss's pull on the routers and the
    budget term's push cancel along the skipped count: the penalty's starting point for warm-started routers.

    Started at 0 instead, the PI rule needs ~20 steps to find it while the distillation loss alone pulls the routers
    towards running everything: measured on SmolLM2 (N = 4, runs/final7), the count fell from 4 to 1.7 by step 15,
    then overshot to 5.5 at step 28, and the loss took ~30 more steps to recover. The routers move by Adam, whose
    first steps go along g / rms(g) per parameter, so the balance is where that direction leaves the count
    unchanged: sum_i dS/dθ_i * m_i(lam) / rms_i(lam) = 0, with m and rms over the micro-batches of
    g_main - lam * g_S (the budget term is lam * (target - S)). That sum falls as lam grows; bisection finds it."""
    def flat(grads):  # one vector over the routers' parameters (None: a parameter the loss does not reach)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, routers)])

    g_main, g_s = [], []
    for i, batch in enumerate(batches):
        try:
            f = _forward(fm, batch, cfg, head, target, budget, cached[i] if cached else None)
            # main + extra: everything but the budget term, which is 0 here (lam = 0 before the first step)
            gm = torch.autograd.grad(f["main"] + f["extra"], routers, retain_graph=True, allow_unused=True)
            gs = torch.autograd.grad(f["skipped_st"].mean(), routers, allow_unused=True)
        finally:
            fm.state.capacity = None
        g_main.append(flat(gm))
        g_s.append(flat(gs))
    g_main, g_s = torch.stack(g_main), torch.stack(g_s)  # [batches, params]
    ds = g_s.mean(0)

    def drift(lam: float) -> float:  # first-order change of the count along Adam's direction (times -1/lr)
        g = g_main - lam * g_s
        return float((ds * g.mean(0) / (g.pow(2).mean(0).sqrt() + 1e-12)).sum())

    lo, hi = -budget.limit, budget.limit
    if drift(hi) > 0:  # no balance within the anti-windup limit: start at the nearer end
        return hi
    if drift(lo) < 0:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if drift(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


# ---- held-out evaluation (flexicli/evaluation/evaluate.py's metrics: one implementation for train and eval) ----
def heldout_metrics(fm, rows: torch.Tensor, batch_size: int = 4) -> dict:
    """KL(original || routed), top-1 agreement, mean skipped layers and per-layer skip rate on held-out rows (their
    text.PAD left out)."""
    from ..data.text import unpadded
    from ..evaluation.evaluate import compare_teacher_forced

    return compare_teacher_forced(fm, unpadded(rows), {"mode": "routed"}, batch_size)


def greedy_agreement(fm, prompts: list[str], new_tokens: int = 32) -> dict:
    """Share of held-out prompts whose greedy continuation is identical, and mean first-divergence position."""
    from ..data.tokens import prompt_ids
    from ..evaluation.evaluate import compare_greedy

    ids = [prompt_ids(fm.tokenizer, p, chat=True) for p in prompts]
    return compare_greedy(fm, ids, new_tokens, {"mode": "routed"}, 8)


# ---- the whole run ------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What setup hands the steps: the run's config (a resumed run's own), optimiser, budget and data."""
    cfg: TrainConfig
    dist: object
    device: torch.device
    head: object
    params: list
    routers: list
    opt: torch.optim.Optimizer
    budget: object
    start: int
    rows: torch.Tensor | None = None
    heldout: torch.Tensor | None = None
    cache: object = None
    warm: bool = False
    ema: list | None = None  # the weight average (cfg.ema > 0), one tensor per trainable parameter
    validation: torch.Tensor | None = None
    source: torch.Tensor | None = None  # each training row's source (data mix: 0 conversation, 1 documentation)
    select: bool = False  # the checkpoint gets the evaluated weights with the lowest validation KL (cfg.select)
    best: dict | None = None  # {"step", "kl", "weights", "budget"}: the best evaluated so far
    rollbacks: list = field(default_factory=list)  # the evaluations (steps) that sent training back to the best
    log: object = print
    seconds: dict = field(default_factory=dict)  # wall time per phase of this process (the summary's "wall_seconds")


def train(fm, cfg: TrainConfig, folder: Path | None = None, resume: bool = False, rows: torch.Tensor | None = None,
          heldout: torch.Tensor | None = None, validation: torch.Tensor | None = None, stop_after: int | None = None,
          progress=None, log=print, source: torch.Tensor | None = None) -> dict:
    """Train `fm` in place; returns the summary (held-out metrics, the fits before step 0).

    `rows`/`heldout`/`validation` ([n, seq_len] token ids) override the text data (tests, tiny models); `source` ([n],
    with `rows`) gives each row's data source (0 conversation, 1 documentation) for source_spread. `stop_after` ends
    the run after that many steps as if it were killed there (tests of --resume). `progress(stage, done, total,
    info)`, if given, hears each stage ("data", "routers", "adapters", "train"); `log(message)` gets one line per
    event."""
    cfg = cfg.resolved(has_source=source is not None if rows is not None else cfg.data == "mix")
    cfg.check(fm.capacity)
    folder = Path(folder) if folder else fm.path
    dist = distributed.current()  # flexicli/train/distributed.py; a no-op for one process
    if not dist.is_main:  # distributed: rank 0 reports
        log, progress = (lambda m: None), None
    run = _setup(fm, cfg, folder, resume, dist, log)
    for phase, work in (("data", lambda: _data(fm, run, rows, heldout, validation, progress, log, source)),
                        ("warm_starts", lambda: _before_step_0(fm, run, progress, log)),
                        ("steps", lambda: _steps(fm, run, folder, stop_after, progress))):
        t0 = time.perf_counter()
        stopped_at = work()
        run.seconds[phase] = round(time.perf_counter() - t0, 1)
    return {"stopped_at": stopped_at} if stopped_at is not None else _finish(fm, run, folder)


def _setup(fm, cfg: TrainConfig, folder: Path | None, resume: bool, dist, log) -> _Run:
    """The model made trainable (shard/move it when distributed), the optimiser, the budget, and a resumed run's
    state."""
    dist.check_batch(cfg.batch_size)
    distributed.prepare(fm, dist)
    torch.manual_seed(cfg.seed)
    release_freed_memory()
    params = fm.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    routers = [p for layer in fm.layers for r in layer.routers.values() for p in r.parameters()]
    adapters = [p for layer in fm.layers for p in layer.adapter.parameters()]
    opt = torch.optim.AdamW([{"params": adapters, "scale": 1.0}, {"params": routers, "scale": cfg.router_lr_scale}],
                            lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=0.0)
    start, budget_state, weights, selected, rollbacks = 0, None, {}, None, []
    if resume:
        if folder is None:
            raise BadInput("nothing to resume: no checkpoint folder", "start without --resume")
        if (folder / TRAIN_STATE).is_file():
            start, saved_cfg, budget_state, weights, selected, rollbacks = load_training(folder, opt)
            # "ema": 0 and "select": False for runs saved before the weight average and the selection existed
            # and "source_spread": 0 for those saved before the term existed
            cfg = TrainConfig.from_dict({"ema": 0.0, "select": False, "source_spread": 0.0, **saved_cfg,
                                         "steps": max(cfg.steps, saved_cfg["steps"])})
            log(f"resuming at step {start} of {cfg.steps}")
        elif (fm.config.training or {}).get("steps_done"):  # trained, but its training state is gone
            raise BadInput(f"nothing to resume in {folder}: it was trained but has no {TRAIN_STATE}",
                           "start without --resume to train it further from step 0")
        else:
            # Never saved by a run (a run killed before its first save leaves the folder as it was): the same start
            # as without --resume, so "rerun with --resume until done" also covers a kill before the first save.
            log(f"no {TRAIN_STATE} in {folder} (no step saved yet): starting from step 0")
        if dist.is_main:
            trim_metrics(folder / METRICS, start)
    # kl: the budget (flexicli/train/budget.py) keeps the mean skipped count at the target; lm (FlexiDepth): the
    # threshold stays where it is and their penalty alpha * (sum of gates)^2 sets the count
    budget = BUDGETS[cfg.budget](fm.capacity, logit=threshold_logit(fm.state.threshold), costs=fm.unit_costs)
    if budget_state is not None:
        budget.load(budget_state)
        if cfg.objective == "kl":
            fm.set_threshold(budget.threshold)
    with torch.no_grad():
        if "last" in weights:  # a finished run's checkpoint holds the average: go on from the last step's weights
            torch._foreach_copy_(params, [w.to(p.device, p.dtype) for w, p in zip(weights["last"], params)])
        if cfg.ema == 0:
            ema = None
        elif "ema" in weights:  # resumed: the average so far
            ema = [w.to(p.device, p.dtype) for w, p in zip(weights["ema"], params)]
        else:
            ema = [p.detach().clone() for p in params]
    fm.state.checkpointing = cfg.gradient_checkpointing
    # a selection saved before candidates were compared at the target (no "at_target") is not comparable with the
    # evaluations still to come: the resumed run picks among those
    best = ({**selected, "weights": weights["best"]} if selected and selected.get("at_target") and "best" in weights
            else None)
    return _Run(ema=ema, best=best, rollbacks=rollbacks, log=log, cfg=cfg, dist=dist,
                device=next(fm.model.parameters()).device,
                head=logits_fn(fm.model), params=params, routers=routers, opt=opt, budget=budget, start=start,
                warm=cfg.warm_start and dist.world_size == 1)  # distributed: no warm start yet (fresh routers)


def _data(fm, run: _Run, rows, heldout, validation, progress, log, source=None) -> None:
    """Training, validation and held-out rows (the built-in data unless given), and the teacher cache over them."""
    cfg, dist = run.cfg, run.dist
    run.source = source
    if rows is None:
        log("preparing data (the original model answers the built-in prompts once; cached afterwards)")
        answers = (lambda done, total: progress("data", done, total, "answers")) if progress else None
        with dist.main_first():  # distributed: rank 0 fills the data cache, the others then read it
            rows, validation, run.source = training_data(fm, cfg, progress=answers)
            heldout = heldout_rows(fm, cfg.seq_len, progress=answers)
    log(f"data: {rows.shape[0]} training rows x {cfg.seq_len} tokens, {0 if heldout is None else heldout.shape[0]} "
        "held-out rows" + (" (no tokenizer: no held-out evaluation or calibration)" if fm.tokenizer is None else ""))
    run.rows, run.heldout, run.validation = rows, heldout, validation
    if cfg.source_spread > 0 and run.source is None:
        raise BadInput("source_spread > 0 needs each row's source: the built-in data mix has them, rows given "
                       "without `source` do not", "set source_spread: 0")
    if cfg.objective == "kl" and cfg.answer_weight > 0:  # refused here, not found out as weights of 1 at every step
        from ..data.tokens import answer_header

        weighted = (answer_weights(rows, *answer_header(fm.tokenizer), cfg.answer_weight) > 1).float().mean().item()
        if weighted == 0:
            raise BadInput("answer_weight > 0, but the training rows hold no assistant answers",
                           "train on chat data (data mix, selfgen or conversations) or set answer_weight: 0")
        log(f"answer weighting: {weighted:.1%} of the training tokens predict answer tokens (the first ones weigh "
            "most)")
    run.select = cfg.select and validation is not None and cfg.calibrate and heldout is not None
    if cfg.select and not run.select and run.start < cfg.steps:
        why = ("no validation rows (they come with data selfgen and mix)" if validation is None
               else "no calibration afterwards, which a checkpoint of another step's routers needs")
        log(f"the checkpoint will hold the last step's weights{' (average)' if cfg.ema else ''}: {why}")
    if cfg.cache_teacher and dist.world_size == 1 and cache_bytes(fm, rows) < CACHE_LIMIT:
        from .teacher import TeacherCache

        # filled as steps first reach each row; with the hidden-state term also each routed layer's output
        run.cache = TeacherCache(fm, rows, lazy=True, layers=cfg.objective == "kl" and cfg.hidden_weight > 0)


def _before_step_0(fm, run: _Run, progress, log) -> None:
    """A new run's starts: routers fitted to rank tokens by influence, adapters fitted to the update they replace,
    the penalty's lambda at its balance. Their reports go into the checkpoint, so a resumed run reports them too."""
    cfg, rows = run.cfg, run.rows
    # what the fits are about (flexicli/core/units.py): routers rank by their unit's influence, and an adapter
    # stands in for the whole layer (skip unit layer) or for the MLP (module, mlp)
    unit_word = "layer" if fm.config.skip_unit == "layer" else "sublayer"
    replaced = "layer's" if fm.config.skip_unit == "layer" else "MLP's"
    stage = lambda name: (lambda done, total: progress(name, done, total, "")) if progress else None  # noqa: E731
    if cfg.objective == "kl" and cfg.budget == "capacity" and not run.warm:
        log("note: per-unit capacities with fresh routers pick tokens almost at random until the routers learn; "
            "measured on SmolLM2: KL 3+ in the first 20 steps. --budget penalty suits fresh routers better"
            + (" (the router warm start is single-process only)" if cfg.warm_start else ""))
    if run.start > 0:
        return
    if fm.config.training:  # a new run: no fit reports of an earlier run carried over
        fm.config.training = {k: v for k, v in fm.config.training.items()
                              if k not in ("router_fit", "adapter_fit", "penalty_start")}
    reports = {}

    def routers():
        from .router_init import warm_start_routers

        reports["router_fit"] = warm_start_routers(fm, rows, cfg.skip_target, progress=stage("routers"),
                                                    max_share=cfg.max_skip_share, measure=cfg.router_init)
        fits = reports["router_fit"]["spearman_heldout"].values()
        measure = {"influence": f"{unit_word} influence", "cost": "the cost of skipping",
                   "blend": f"{unit_word} influence and the cost of skipping"}[cfg.router_init]
        log(f"routers warm-started: rank correlation with {measure} {min(fits):.2f}..{max(fits):.2f} "
            "(tokens not fitted on)")

    # the skip cost is measured with the fitted adapters in place; influence does not depend on them
    if run.warm and cfg.router_init == "influence":
        routers()
    if cfg.adapter_init == "fit":
        from .adapter_init import fit_adapters

        reports["adapter_fit"] = fit = fit_adapters(fm, rows, progress=stage("adapters"))
        if fit["explained_heldout"]:
            shares = fit["explained_heldout"].values()
            log(f"adapters fitted: {min(shares):.2f}..{max(shares):.2f} of each {replaced} update reproduced "
                "(tokens not fitted on)")
        if fit["random_neurons"]:
            log(f"adapters keep random gate/up (the MLP has no gate_proj/up_proj/act_fn to copy neurons from): "
                f"layers {fit['random_neurons']}")
        if fit["not_fitted"]:
            log(f"adapters left fresh (a fit no better than adding nothing, or an output norm that is not RMS): "
                f"layers {fit['not_fitted']}")
    if run.warm and cfg.router_init in ("cost", "blend"):
        routers()
    budget = run.budget
    if run.warm and cfg.objective == "kl" and budget.kind == "penalty" and cfg.penalty_start == "balance":
        idx = [batch_indices(rows.shape[0], cfg.seed, m, cfg.batch_size) for m in range(4)]  # the first 4 micro-batches
        budget.integral = budget.lam = reports["penalty_start"] = penalty_balance(
            fm, [rows[i] for i in idx], cfg, run.head, cfg.skip_target, budget, run.routers,
            cached=[run.cache.lookup(i, run.device) for i in idx] if run.cache else None)
        log(f"budget penalty starts at lambda {budget.lam:.3f} (where the distillation loss and the budget balance)")
    if reports:
        fm.config.training = {**(fm.config.training or {}), **reports}


def _steps(fm, run: _Run, folder: Path | None, stop_after: int | None, progress) -> int | None:
    """The optimiser steps from run.start to the end; returns the step it stopped at if `stop_after` ended it."""
    cfg, dist, budget, opt, rows = run.cfg, run.dist, run.budget, run.opt, run.rows
    # fresh routers: the target ramps up from 0, so the adapters learn while few tokens skip
    ramp_steps = (cfg.ramp if cfg.ramp is not None else 0.0 if run.warm else 0.3) * cfg.steps
    full_target_from = max(0, math.ceil(ramp_steps) - 1)  # the weight average starts here: no weights of the ramp
    metrics_path = folder / METRICS if folder else None
    fm.model.train(False)  # no dropout: the student must see the teacher's exact computation
    for step in range(run.start, cfg.steps):
        t0 = time.perf_counter()
        target = cfg.skip_target * min(1.0, (step + 1) / max(1, ramp_steps))
        for g in opt.param_groups:
            g["lr"] = run_lr(step, cfg, run.rollbacks) * g["scale"]
        stats = []
        for m in range(cfg.grad_accum):  # distributed: this rank's share of the global micro-batch
            idx = dist.shard(batch_indices(rows.shape[0], cfg.seed, step * cfg.grad_accum + m, cfg.batch_size))
            stats.append(train_step(fm, rows[idx], cfg, run.head, target, budget,
                                    cached=run.cache.lookup(idx, run.device) if run.cache else None,
                                    source=run.source[idx] if run.source is not None else None))
        dist.average_gradients(run.params)  # distributed: gradients and metrics over the global batch
        stats = dist.global_stats(stats)
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(run.ema, run.params, 1.0 - ema_decay(max(0, step - full_target_from), cfg.ema))
        skipped = sum(s["skipped"] for s in stats) / len(stats)
        if cfg.objective == "kl":  # distributed: each micro-batch's logits over all ranks
            budget.after_step(target, skipped, [dist.gather(s["logits"]) for s in stats])
            fm.set_threshold(budget.threshold)
        tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        unit_rates = (sum(s["layer_skip"] for s in stats) / len(stats)).tolist()
        rec = {"step": step + 1, "loss": sum(s["loss"] for s in stats) / len(stats),
               "top1_agreement": sum(s["agree"] for s in stats) / len(stats), "mean_skipped_layers": skipped,
               "target": target, "threshold": fm.state.threshold, **budget.log(),
               # the spread of the rows' own counts around the batch's (rank 0's when distributed): the budget holds
               # the mean, which one kind of text can spend while another skips little
               "row_skip_std": sum(s["row_std"] for s in stats) / len(stats),
               "lr": run_lr(step, cfg, run.rollbacks),
               "tokens_per_s": tokens / (time.perf_counter() - t0),
               # per routed unit, the share of tokens that skipped it (rank 0's micro-batches when distributed): the
               # count alone hides whether skips spread over units or settle into static removal of a few layers
               "unit_skip_rate": dict(zip(fm.unit_labels, [round(x, 3) for x in unit_rates]))}
        by_source = [s["by_source"] for s in stats]
        for k, name in ((0, "conversations"), (1, "docs")):  # data mix: the count per kind of text (source_spread)
            got = [b[k] for b in by_source if k in b]
            if got:
                rec[f"skipped_{name}"] = sum(got) / len(got)
        if stats[0]["hidden"] is not None:  # the per-layer hidden-state term, unweighted (rank 0's when distributed)
            rec["hidden_loss"] = sum(s["hidden"] for s in stats) / len(stats)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            _evaluate(fm, run, step + 1, rec)
        if metrics_path and dist.is_main:  # distributed: rank 0 writes
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if progress:
            progress("train", step + 1, cfg.steps,
                     f"loss {rec['loss']:.4f}  skipped {skipped:.2f}  {rec['tokens_per_s']:.0f} tok/s")
        kill_point("step")  # tests of crash safety (FLEXI_TEST_KILL_AT); nothing otherwise
        done = step + 1
        if folder and (done % cfg.save_every == 0 or done == cfg.steps or done == stop_after):
            dist.on_main(save_training, fm, folder, cfg, done, opt, budget, None,  # others wait
                         _kept_weights(run), _selection(run), run.rollbacks)
        if stop_after is not None and done >= stop_after:
            return done
    return None


def _evaluate(fm, run: _Run, step: int, rec: dict) -> None:
    """Mid-run evaluation into `rec`: with validation rows, the weights the checkpoint would hold now (the average
    when ema is on) on them, kept if the best so far; without, the current weights on the first held-out rows."""
    cfg = run.cfg
    if run.validation is None:
        if run.heldout is not None:
            rec["heldout"] = heldout_metrics(fm, run.heldout[: cfg.eval_rows])
        return
    rows = run.validation[: cfg.eval_rows]
    if run.ema is None:
        candidate = run.params
        rec["validation"] = m = _validation_metrics(fm, run, rows)
    else:  # the average in place of the live weights for the pass, then the live weights back
        candidate, live = run.ema, [p.detach().clone() for p in run.params]
        with torch.no_grad():
            torch._foreach_copy_(run.params, run.ema)
        try:
            rec["validation"] = m = _validation_metrics(fm, run, rows)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(run.params, live)
    if run.select and (run.best is None or m["kl"] < run.best["kl"]):
        run.best = {"step": step, "kl": m["kl"], "weights": [t.detach().clone() for t in candidate],
                    "budget": run.budget.state()}
    elif run.select and cfg.rollback and m["kl"] > cfg.rollback * run.best["kl"]:
        _roll_back(fm, run, step, rec)


def _roll_back(fm, run: _Run, step: int, rec: dict) -> None:
    """Training diverged (validation KL over cfg.rollback times the best so far): go on from the best evaluated
    weights (live and averaged), the budget's state of that evaluation and fresh Adam moments (the old ones point
    where it diverged), at half the learning rate, re-warmed (run_lr). The data order goes on: the batches after the
    divergence are not replayed."""
    best = run.best
    with torch.no_grad():
        torch._foreach_copy_(run.params, best["weights"])
        if run.ema is not None:
            torch._foreach_copy_(run.ema, best["weights"])
    run.opt.state.clear()
    if best.get("budget") is not None:  # a selection saved before rollbacks existed has none: the budget goes on
        run.budget.load(best["budget"])
        if run.cfg.objective == "kl":
            fm.set_threshold(run.budget.threshold)
    run.rollbacks.append(step)
    rec["rollback"] = {"to_step": best["step"], "lr_factor": rollback_factor(run.rollbacks)}
    run.log(f"step {step}: validation KL {rec['validation']['kl']:.3f} is over {run.cfg.rollback:g}x the best "
            f"({best['kl']:.3f}, step {best['step']}): back to step {best['step']}'s weights, learning rate x "
            f"{rec['rollback']['lr_factor']:g}")


def _validation_metrics(fm, run: _Run, rows: torch.Tensor) -> dict:
    """With selection on: at the threshold that skips the target on these rows, the way the checkpoint will be
    calibrated at the end, so the candidates are compared at equal compute (at the trained threshold, weights that
    skip fewer layers, as early in a run, win on KL: measured, an early step picked that kept 0.211 KL once
    calibrated against 0.153 for the last step's weights). Without selection: at the trained threshold."""
    if not run.select:
        return heldout_metrics(fm, rows)
    threshold = calibrate_threshold(fm, rows, run.cfg.skip_target, start=fm.config.threshold)
    with fm.routing(threshold=threshold):
        return {**heldout_metrics(fm, rows), "threshold": threshold}


def _kept_weights(run: _Run) -> dict | None:
    """The weight lists a save keeps in the training state for --resume: the average and the best so far."""
    kept = {"ema": run.ema} if run.ema is not None else {}
    if run.best is not None:
        kept["best"] = run.best["weights"]
    return kept or None


def _selection(run: _Run) -> dict | None:
    if run.best is None:
        return None
    return {"step": run.best["step"], "kl": run.best["kl"], "at_target": True, "budget": run.best["budget"]}


def _finish(fm, run: _Run, folder: Path | None) -> dict:
    """Held-out metrics, the threshold calibrated to the target, greedy agreement; the final save."""
    cfg, t0 = run.cfg, time.perf_counter()
    for p in run.params:
        p.requires_grad_(False)
    summary = {"steps": cfg.steps, "objective": cfg.objective, "data": cfg.data, "budget": cfg.budget,
               "router_init": cfg.router_init, "adapter_init": cfg.adapter_init}
    weights = _kept_weights(run)
    # the checkpoint gets the best evaluated weights on validation (cfg.select), else the average (cfg.ema), else
    # the last step's; the last step's weights stay in the training state for --resume
    chosen = run.best["weights"] if run.select and run.best is not None else run.ema
    if run.select and run.best is not None:
        summary["selected_step"], summary["selected_validation_kl"] = run.best["step"], run.best["kl"]
    if chosen is not None and (run.ema is not None or run.best["step"] != cfg.steps):
        if run.heldout is not None:
            last = heldout_metrics(fm, run.heldout)
            summary["last_step"] = {k: last[k] for k in ("kl", "kl_p99", "top1_agreement", "mean_skipped_layers")}
        weights = {**(weights or {}), "last": [p.detach().clone() for p in run.params]}
        # averaged (or earlier) routers skip a little more or less than the last step's under the threshold the
        # budget trained, so they are taken only when calibration sets the threshold afterwards; adapters always are
        calibrated = cfg.calibrate and run.heldout is not None
        routers = {id(p) for p in run.routers}
        pairs = [(p, e) for p, e in zip(run.params, chosen) if calibrated or id(p) not in routers]
        with torch.no_grad():
            torch._foreach_copy_([p for p, _ in pairs], [e for _, e in pairs])
    if run.ema is not None:
        summary["ema"] = cfg.ema
    if run.rollbacks:
        summary["rollbacks"] = list(run.rollbacks)
    if run.heldout is not None:
        # the count alone first (routed decoder pass, no original, no LM head): the metrics are then computed once,
        # at the threshold the checkpoint keeps
        summary["trained_threshold_skipped"] = skipped = mean_skipped(fm, run.heldout)
        if cfg.calibrate and abs(skipped - cfg.skip_target) > 0.1:
            fm.set_threshold(calibrate_threshold(fm, run.heldout, cfg.skip_target, start=fm.config.threshold))
        summary.update(heldout_metrics(fm, run.heldout), threshold=fm.config.threshold)
        if fm.tokenizer is not None:
            from ..data.text import heldout_prompts

            summary.update(greedy_agreement(fm, heldout_prompts(10)))
    for key in ("router_fit", "adapter_fit", "penalty_start"):  # from before step 0, maybe an earlier process
        if (fm.config.training or {}).get(key) is not None:
            summary[key] = fm.config.training[key]
    if folder:
        run.dist.on_main(save_training, fm, folder, cfg, cfg.steps, run.opt, run.budget, summary, weights,
                         _selection(run), run.rollbacks)
    # where this process's time went (a resumed run's counts start at the resume): in the summary returned, not in
    # the checkpoint, whose bytes must not depend on the machine's speed (a resumed run saves what an unbroken one does)
    return {**summary, "wall_seconds": {**run.seconds, "finish": round(time.perf_counter() - t0, 1)}}
