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
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from . import distributed
from .checkpoint import kill_point
from .errors import BadInput
from .layer import threshold_logit, threshold_of
from .objectives import BUDGETS, distill_loss, gate_logits, gate_margin, gate_stats, lm_loss, logits_fn, unit_density
from .teacher import cache_bytes

TRAIN_STATE = "train_state.safetensors"
CACHE_LIMIT = 4 * 2**30  # teacher cache bytes; memory is only touched for rows a run reaches (TeacherCache lazy)
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    skip_target: float
    steps: int = 180  # with the other defaults, convert + train of SmolLM2-135M fit in 60 min on 2 CPU cores (README)
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-3  # adapters; routers get lr * router_lr_scale
    router_lr_scale: float = 0.15  # a router's decision is a cliff: small steps keep tokens from flipping en masse
    margin_weight: float | None = None  # > 0: push gates off the threshold (objectives.gate_margin); None: see `margin`
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    seed: int = 0
    data: str = "mix"  # mix (selfgen + docs) | selfgen | prompts | docs | PATH (.jsonl/.txt) | Hub dataset id
    objective: str = "kl"  # kl (distillation, ours) | lm (FlexiDepth: LM loss + alpha * mean_t (sum_l w)^2)
    alpha: float = 1e-3  # FlexiDepth's penalty weight (objective lm only)
    budget: str = "penalty"  # penalty: PI-controlled Lagrange term | capacity: per-unit shares (objectives.BudgetCapacity) | threshold: quantile
    #                          | density: per-unit target density (objectives.BudgetDensity)
    router_init: str = "influence"  # influence: fit the routers to token-level unit influence first (router_init.py) | none: fresh routers
    adapter_init: str = "fit"  # fit: fitted to the update it replaces before step 0 (adapter_init.py) | none: fresh adapters (add nothing)
    penalty_start: str = "balance"  # penalty budget with warm-started routers: balance: lambda starts where the losses balance (train.penalty_balance) | zero
    ramp: float | None = None  # share of the steps over which the skip target ramps up from 0; None: 0 when the routers are warm-started (they skip about the target from step 0), else 0.3
    eval_every: int = 60
    eval_rows: int = 8
    save_every: int = 60
    gradient_checkpointing: bool = True  # measured: peak RSS 1.12x the frozen model's, against 1.60x without (README)
    calibrate: bool = True  # after training, nudge the threshold so held-out mean skipped == target
    selfgen_tokens: int = 96
    docs_chars: int = 1_500_000  # data docs/mix: characters of package documentation (~4 per token)
    cache_teacher: bool = True  # keep teacher hidden states per row (if under CACHE_LIMIT): about half the work per step

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(f"unknown training settings {unknown}", f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def check(self, num_routed: float | None = None) -> None:
        """`num_routed` None: only what can be checked before the model is loaded (the CLI checks flags early); else
        the most layer-equivalents a token can skip (FlexiModel.capacity: the routed layers, for `layer`)."""
        if self.skip_target < 0:
            raise BadInput(f"--skip-target {self.skip_target} is negative", "it is a count of layers to skip")
        if num_routed is not None and self.skip_target > num_routed + 1e-9:
            what = "the routed layers" if float(num_routed).is_integer() else \
                "layer-equivalents: the routed units' share of their layers' parameters"
            raise BadInput(f"--skip-target {self.skip_target} is outside 0..{num_routed:g} ({what})")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be at least 1")
        if self.objective not in ("kl", "lm"):
            raise BadInput(f"objective must be 'kl' or 'lm', not {self.objective!r}")
        if self.budget not in BUDGETS:
            raise BadInput(f"budget must be one of {sorted(BUDGETS)}, not {self.budget!r}")
        if self.router_init not in ("influence", "none"):
            raise BadInput(f"router_init must be 'influence' or 'none', not {self.router_init!r}")
        if self.penalty_start not in ("balance", "zero"):
            raise BadInput(f"penalty_start must be 'balance' or 'zero', not {self.penalty_start!r}")
        if self.adapter_init not in ("fit", "none"):
            raise BadInput(f"adapter_init must be 'fit' or 'none', not {self.adapter_init!r}")

    @property
    def margin(self) -> float:
        """The margin weight in effect. Under per-layer capacities the margin is what makes the one inference
        threshold reproduce the trained decisions (objectives.gate_margin): 0.05. With warm-started routers under the
        penalty, 0.03 keeps the gates from bunching at the threshold (measured: README, Training). With fresh
        routers it stays off: there it made whole routers cross the threshold at once."""
        if self.margin_weight is not None:
            return self.margin_weight
        if self.budget == "capacity":
            return 0.05
        return 0.03 if self.warm_start and self.budget == "penalty" else 0.0

    @property
    def warm_start(self) -> bool:
        """Routers are fitted before training (distillation only: FlexiDepth's objective starts from scratch)."""
        return self.router_init == "influence" and self.objective == "kl"


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"  # inside the package: an installed wheel has them too


def load_recipe(name_or_file: str) -> dict:
    import yaml

    path = Path(name_or_file)
    if not path.is_file():
        path = recipes_dir() / f"{name_or_file}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
        raise BadInput(f"no recipe or config file {name_or_file!r}", f"recipes: {', '.join(known)}")
    data = yaml.safe_load(path.read_text()) or {}
    return data.get("train", data)


# ---- data ---------------------------------------------------------------------------------------------------
def training_rows(fm, cfg: TrainConfig, progress=None) -> torch.Tensor:
    from . import data

    prompts = data.builtin_prompts("train")
    if cfg.data in ("selfgen", "mix"):
        texts = data.conversations(fm, prompts, data.teacher_answers(fm, prompts, cfg.selfgen_tokens,
                                                                     progress=progress))
        if cfg.data == "mix":  # packed apart (no row straddles the two), the conversations repeated until they
            chat = data.pack(fm.tokenizer, texts, cfg.seq_len)  # are about half the rows: the held-out text and
            docs = data.pack(fm.tokenizer, data.package_docs(cfg.docs_chars), cfg.seq_len)  # the chat template stay
            return torch.cat([chat.repeat(max(1, round(docs.shape[0] / chat.shape[0])), 1), docs])  # well covered
    elif cfg.data == "docs":
        texts = data.package_docs(cfg.docs_chars)
    elif cfg.data == "prompts":
        texts = data.conversations(fm, prompts, None)
    else:
        texts = data.read_data(cfg.data, fm.tokenizer)
    rows = data.pack(fm.tokenizer, texts, cfg.seq_len)
    vocab = fm.model.get_input_embeddings().num_embeddings
    if rows.max().item() >= vocab:  # token-id data (input_ids rows): an embedding lookup would fail mid-run
        raise BadInput(f"--data {cfg.data} has token id {rows.max().item()}, outside the model's vocabulary ({vocab})")
    return rows


def heldout_rows(fm, seq_len: int, progress=None) -> torch.Tensor | None:
    """The held-out prompts with the original model's answers; None for a model without a tokenizer (trained from
    token ids): no held-out text can be made for it, so the run has no held-out evaluation or calibration."""
    from . import data

    if fm.tokenizer is None:
        return None
    return data.pack(fm.tokenizer, data.heldout_texts(fm, progress=progress), seq_len)


def batch_indices(n: int, seed: int, index: int, batch_size: int) -> torch.Tensor:
    """Rows of micro-batch number `index`: a pure function of (seed, index), so resuming replays the same order."""
    picks = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        picks.append(perm[pos].item())
    return torch.tensor(picks)


def batch_at(rows: torch.Tensor, seed: int, index: int, batch_size: int) -> torch.Tensor:
    return rows[batch_indices(rows.shape[0], seed, index, batch_size)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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


def decoder_of(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def _forward(fm, batch, cfg: TrainConfig, head, target: float, budget, cached=None) -> dict:
    """The student's forward of one micro-batch and its loss terms (no backward). Sets fm.state.capacity, which the
    caller clears after backward: gradient checkpointing recomputes each layer there and must take the same
    decisions."""
    from .teacher import start_at_first_routed

    decoder = decoder_of(fm.model)
    device = next(fm.model.parameters()).device
    batch = batch.to(device)
    if cached is not None:
        prefix_h, teacher_h = cached
    elif cfg.objective == "kl":
        with torch.no_grad(), fm.routing("full"):
            teacher_h = decoder(input_ids=batch).last_hidden_state
    fm.state.gates = []
    shares = budget.capacity(target) if cfg.objective == "kl" else None
    fm.state.capacity = dict(zip(fm.unit_keys, shares)) if shares is not None else None
    try:
        with fm.routing("routed"), (start_at_first_routed(fm, prefix_h) if cached is not None else nullcontext()):
            student_h = decoder(input_ids=batch).last_hidden_state
        skipped_st, gate_sum, layer_skip = gate_stats(fm.state.gates)
        density = unit_density(fm.state.gates) if budget.kind == "density" else None
        logits = gate_logits(fm.state.gates)
        margin = gate_margin(fm.state.gates, budget.logit).mean() if cfg.margin else 0.0
    except BaseException:
        fm.state.capacity = None
        raise
    finally:
        fm.state.gates = None
    if cfg.objective == "kl":
        main, agree = distill_loss(student_h, teacher_h, head)
        extra = budget.loss(target, skipped_st, density) + cfg.margin * margin
    else:
        main, agree = lm_loss(student_h, batch, head), torch.tensor(float("nan"))
        extra = cfg.alpha * gate_sum.pow(2).mean()
    return {"main": main, "agree": agree, "extra": extra, "skipped_st": skipped_st, "layer_skip": layer_skip,
            "logits": logits}


def train_step(fm, batch, cfg: TrainConfig, head, target: float, budget, cached=None) -> dict:
    """One micro-batch: forward, loss, backward. `cached`: (hidden entering the first routed layer, teacher's final
    hidden) from a TeacherCache; without it the teacher and the student's unrouted layers are recomputed."""
    try:
        f = _forward(fm, batch, cfg, head, target, budget, cached)
        ((f["main"] + f["extra"]) / cfg.grad_accum).backward()
    finally:
        fm.state.capacity = None
    return {"loss": f["main"].item(), "agree": f["agree"].item(), "skipped": f["skipped_st"].mean().item(),
            "layer_skip": f["layer_skip"].detach().cpu(), "logits": f["logits"]}


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
    g_main, g_s = [], []
    for i, batch in enumerate(batches):
        try:
            f = _forward(fm, batch, cfg, head, target, budget, cached[i] if cached else None)
            # main + extra: everything but the budget term, which is 0 here (lam = 0 before the first step)
            gm = torch.autograd.grad(f["main"] + f["extra"], routers, retain_graph=True, allow_unused=True)
            gs = torch.autograd.grad(f["skipped_st"].mean(), routers, allow_unused=True)
        finally:
            fm.state.capacity = None
        flat = lambda gs_: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()  # noqa: E731
                                      for g, p in zip(gs_, routers)])
        g_main.append(flat(gm))
        g_s.append(flat(gs))
    g_main, g_s = torch.stack(g_main), torch.stack(g_s)  # [batches, params]
    ds = g_s.mean(0)

    def drift(lam: float) -> float:  # first-order change of the count along Adam's direction (times -1/lr)
        g = g_main - lam * g_s
        return float((ds * g.mean(0) / (g.pow(2).mean(0).sqrt() + 1e-12)).sum())

    lo, hi = -budget.limit, budget.limit
    if drift(hi) > 0 or drift(lo) < 0:  # no balance within the anti-windup limit: start at the nearer end
        return hi if drift(hi) > 0 else lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if drift(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


# ---- held-out evaluation (flexicli/evaluate.py's metrics: one implementation for train and eval) -----------
def heldout_metrics(fm, rows: torch.Tensor, batch_size: int = 4) -> dict:
    """KL(original || routed), top-1 agreement, mean skipped layers and per-layer skip rate on held-out rows."""
    from .evaluate import compare_teacher_forced

    return compare_teacher_forced(fm, rows.tolist(), {"mode": "routed"}, batch_size)


@torch.no_grad()
def mean_skipped(fm, rows: torch.Tensor, batch_size: int = 8, prefix: torch.Tensor | None = None) -> float:
    """Mean routed layers skipped per token, in layer-equivalents (routed pass only: what threshold calibration
    needs). `prefix`: the hidden states entering the first routed layer (TeacherCache.prefix), so the layers before
    it are not rerun."""
    from .teacher import start_at_first_routed

    decoder, device = decoder_of(fm.model), next(fm.model.parameters()).device
    skipped = 0.0
    for i in range(0, rows.shape[0], batch_size):
        start = start_at_first_routed(fm, prefix[i:i + batch_size].to(device)) if prefix is not None else nullcontext()
        with fm.routing("routed"), fm.record() as rec, start:
            decoder(input_ids=rows[i:i + batch_size].to(device))
        skipped += rec.skipped_layers().sum().item()
    return skipped / rows.numel()


def calibrate_threshold(fm, rows: torch.Tensor, target: float, iters: int = 16) -> float:
    """Bisect the threshold so that held-out mean skipped layers == target (more threshold = more skipping). In logit
    space: trained thresholds can sit close to 0 or 1, where bisecting w itself runs out of resolution. The unrouted
    layers before the first routed one run once, not once per iteration."""
    from .teacher import TeacherCache

    prefix = TeacherCache(fm, rows).prefix
    lo, hi = -16.0, 16.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        with fm.routing(threshold=threshold_of(mid)):
            skipped = mean_skipped(fm, rows, prefix=prefix)
        lo, hi = (mid, hi) if skipped < target else (lo, mid)
    return threshold_of((lo + hi) / 2)


def greedy_agreement(fm, prompts: list[str], new_tokens: int = 32) -> dict:
    """Share of held-out prompts whose greedy continuation is identical, and mean first-divergence position."""
    from .evaluate import _ids, compare_greedy

    return compare_greedy(fm, [_ids(fm, p, chat=True) for p in prompts], new_tokens, {"mode": "routed"}, 8)


# ---- saving -------------------------------------------------------------------------------------------------
def save_training(fm, folder: Path, cfg: TrainConfig, step: int, opt, budget, summary: dict | None) -> None:
    from safetensors.torch import save_file

    from .card import render_card
    from .checkpoint import write_checkpoint

    flat, scalars = {}, {"step": step, "budget": budget.state(), "train_config": asdict(cfg)}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(float(v))
    fm.config.training = {**(fm.config.training or {}), **(summary or {}), "skip_target": cfg.skip_target,
                          "steps_done": step, "command": (fm.config.training or {}).get("command", _command())}
    metrics = folder / METRICS
    extra = {METRICS: metrics.read_bytes() if metrics.is_file() else b""}

    def write_state(tmp: Path):
        save_file(flat, tmp / TRAIN_STATE, metadata={"scalars": json.dumps(scalars)})

    write_checkpoint(folder, fm.config, fm.flexi_state_dict(), render_card(fm.config), overwrite=True,
                     extra_files=extra, writer=write_state)


def load_training(folder: Path, opt) -> tuple[int, dict, dict]:
    """Restore the optimiser; returns (steps done, the run's TrainConfig as a dict, the budget's state)."""
    from safetensors import safe_open

    path = folder / TRAIN_STATE
    with safe_open(path, "pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    sd = opt.state_dict()
    for key, v in flat.items():
        i, name = key.split(".", 1)
        sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    return scalars["step"], scalars["train_config"], scalars["budget"]


def trim_metrics(path: Path, step: int) -> None:
    """Cut metrics.jsonl back to the lines of steps 1..step. It is appended live, once a step, outside the atomic
    saves, so a run killed after the last save has lines past it (perhaps a half-written last one); the resumed run
    writes those steps again, and without this they would appear twice. Truncated in place (one call, no temporary
    file in the checkpoint folder)."""
    if not path.is_file():
        return
    keep = 0
    with path.open("rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] > step:
                    break
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
    if keep < path.stat().st_size:
        os.truncate(path, keep)


def _command() -> str:
    # without --resume: the command that reproduces the run (a run saved first by a --resume that found no state)
    args = [a for a in sys.argv[1:] if a != "--resume"]
    return "flexi " + " ".join(shlex.quote(a) for a in args) if sys.argv and "flexi" in sys.argv[0] else ""


# ---- the whole run ------------------------------------------------------------------------------------------
def train(fm, cfg: TrainConfig, folder: Path | None = None, resume: bool = False, rows: torch.Tensor | None = None,
          heldout: torch.Tensor | None = None, stop_after: int | None = None, progress: bool = True,
          log=print) -> dict:
    """Train `fm` in place. `rows`/`heldout` ([n, seq_len] token ids) override the text data (tests, tiny models).
    `stop_after` ends the run after that many steps as if it were killed there (tests of --resume)."""
    cfg.check(fm.capacity)
    folder = Path(folder) if folder else fm.path
    # -- distributed (flexicli/distributed.py; a no-op for one process): shard/move the model, quiet ranks > 0 --
    dist = distributed.current()
    dist.check_batch(cfg.batch_size)
    distributed.prepare(fm, dist)
    if not dist.is_main:
        log, progress = (lambda m: None), False
    # --
    torch.manual_seed(cfg.seed)
    release_freed_memory()
    device = next(fm.model.parameters()).device
    head = logits_fn(fm.model)

    params = fm.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    routers = [p for layer in fm.layers for r in layer.routers.values() for p in r.parameters()]
    adapters = [p for layer in fm.layers for p in layer.adapter.parameters()]
    opt = torch.optim.AdamW([{"params": adapters, "scale": 1.0}, {"params": routers, "scale": cfg.router_lr_scale}],
                            lr=cfg.lr, weight_decay=0.0)
    start, budget_state = 0, None
    if resume:
        if folder is None:
            raise BadInput("nothing to resume: no checkpoint folder", "start without --resume")
        if (folder / TRAIN_STATE).is_file():
            start, saved_cfg, budget_state = load_training(folder, opt)
            cfg = TrainConfig.from_dict({**saved_cfg, "steps": max(cfg.steps, saved_cfg["steps"])})
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
    # kl: the budget (objectives.BUDGETS) keeps the mean skipped count at the target; lm (FlexiDepth): the threshold
    # stays where it is and their penalty alpha * (sum of gates)^2 sets the count
    budget = BUDGETS[cfg.budget](fm.capacity, logit=threshold_logit(fm.state.threshold), costs=fm.unit_costs)
    if budget_state is not None:
        budget.load(budget_state)
        if cfg.objective == "kl":
            fm.state.threshold = fm.config.threshold = budget.threshold
    fm.state.checkpointing = cfg.gradient_checkpointing

    if rows is None:
        log("preparing data (the original model answers the built-in prompts once; cached afterwards)")
        with _progress(progress, "data", "{task.fields[what]}") as bar, dist.main_first():  # distributed: rank 0
            task = bar.add_task("data", total=None, what="")  # fills the data cache, the others then read it
            step = lambda done, total: bar.update(task, completed=done, total=total, what="answers")  # noqa: E731
            rows = training_rows(fm, cfg, progress=step)
            heldout = heldout_rows(fm, cfg.seq_len, progress=step)
    log(f"data: {rows.shape[0]} training rows x {cfg.seq_len} tokens, {0 if heldout is None else heldout.shape[0]} "
        "held-out rows" + (" (no tokenizer: no held-out evaluation or calibration)" if fm.tokenizer is None else ""))
    cache = None
    if cfg.cache_teacher and dist.world_size == 1 and cache_bytes(fm, rows) < CACHE_LIMIT:
        from .teacher import TeacherCache

        cache = TeacherCache(fm, rows, lazy=True)  # filled as steps first reach each row

    # what the fits below are about (flexicli/units.py): routers rank by their unit's influence, and an adapter stands
    # in for the whole layer (skip unit layer) or for the MLP (module, mlp)
    unit_word = "layer" if fm.config.skip_unit == "layer" else "sublayer"
    replaced = "layer's" if fm.config.skip_unit == "layer" else "MLP's"
    init_report, warm = None, cfg.warm_start and dist.world_size == 1  # distributed: not yet (fresh routers)
    if cfg.objective == "kl" and cfg.budget == "capacity" and not warm:
        log("note: per-unit capacities with fresh routers pick tokens almost at random until the routers learn; "
            "measured on SmolLM2: KL 3+ in the first 20 steps. --budget penalty suits fresh routers better"
            + (" (the router warm start is single-process only)" if cfg.warm_start else ""))
    if warm and start == 0:
        from .router_init import warm_start_routers

        with _progress(progress, "routers", "{task.fields[what]}") as bar:
            task = bar.add_task("routers", total=len(fm.unit_keys), what=f"fit to {unit_word} influence")
            init_report = warm_start_routers(fm, rows, cfg.skip_target,
                                             progress=lambda done, total: bar.update(task, completed=done))
        fits = init_report["spearman_heldout"].values()
        log(f"routers warm-started: rank correlation with {unit_word} influence {min(fits):.2f}..{max(fits):.2f} "
            "(tokens not fitted on)")
    adapter_report = None
    if cfg.adapter_init == "fit" and start == 0:
        from .adapter_init import fit_adapters

        with _progress(progress, "adapters", "{task.fields[what]}") as bar:
            task = bar.add_task("adapters", total=len(fm.layers), what=f"fit to each {replaced} update")
            adapter_report = fit_adapters(fm, rows, progress=lambda done, total: bar.update(task, completed=done))
        shares = adapter_report["explained_heldout"].values()
        if shares:
            log(f"adapters fitted: {min(shares):.2f}..{max(shares):.2f} of each {replaced} update reproduced "
                "(tokens not fitted on)")
        if adapter_report["not_fitted"]:
            log(f"adapters not fitted (their output passes through a norm): layers {adapter_report['not_fitted']}")
    if start == 0 and fm.config.training:  # a new run: no fit reports of an earlier run carried over
        fm.config.training = {k: v for k, v in fm.config.training.items() if k not in ("router_fit", "adapter_fit", "penalty_start")}
    if init_report or adapter_report:  # kept in the checkpoint from the first save on: a resumed run reports them too
        fits = {"router_fit": init_report, "adapter_fit": adapter_report}
        fm.config.training = {**(fm.config.training or {}), **{k: v for k, v in fits.items() if v}}
    if warm and start == 0 and cfg.objective == "kl" and budget.kind == "penalty" and cfg.penalty_start == "balance":
        idx = [batch_indices(rows.shape[0], cfg.seed, m, cfg.batch_size) for m in range(4)]  # the first 4 micro-batches
        budget.integral = budget.lam = penalty_balance(
            fm, [rows[i] for i in idx], cfg, head, cfg.skip_target, budget, routers,
            cached=[cache.lookup(i, device) for i in idx] if cache else None)
        fm.config.training = {**(fm.config.training or {}), "penalty_start": budget.lam}
        log(f"budget penalty starts at lambda {budget.lam:.3f} (where the distillation loss and the budget balance)")
    # fresh routers: the target ramps up from 0, so the adapters learn while few tokens skip
    ramp_steps = (cfg.ramp if cfg.ramp is not None else 0.0 if warm else 0.3) * cfg.steps

    metrics_path = folder / METRICS if folder else None
    bar = _progress(progress)
    task = bar.add_task("train", total=cfg.steps, completed=start, loss=float("nan"), skipped=0.0, tps=0.0)
    last_eval: dict = {}
    fm.model.train(False)  # no dropout: the student must see the teacher's exact computation
    with bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            target = cfg.skip_target * min(1.0, (step + 1) / max(1, ramp_steps))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg) * g["scale"]
            stats = []
            for m in range(cfg.grad_accum):  # distributed: this rank's share of the global micro-batch
                idx = dist.shard(batch_indices(rows.shape[0], cfg.seed, step * cfg.grad_accum + m, cfg.batch_size))
                stats.append(train_step(fm, rows[idx], cfg, head, target, budget,
                                        cached=cache.lookup(idx, device) if cache else None))
            dist.average_gradients(params)  # distributed: gradients and metrics over the global batch
            stats = dist.global_stats(stats)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            skipped = sum(s["skipped"] for s in stats) / len(stats)
            if cfg.objective == "kl":  # distributed: each micro-batch's logits over all ranks
                budget.after_step(target, skipped, [dist.gather(s["logits"]) for s in stats])
                fm.state.threshold = fm.config.threshold = budget.threshold
            tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
            rec = {"step": step + 1, "loss": sum(s["loss"] for s in stats) / len(stats),
                   "top1_agreement": sum(s["agree"] for s in stats) / len(stats), "mean_skipped_layers": skipped,
                   "target": target, "threshold": fm.state.threshold, **budget.log(), "lr": lr_at(step, cfg),
                   "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if heldout is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                last_eval = heldout_metrics(fm, heldout[: cfg.eval_rows])
                rec["heldout"] = last_eval
            if metrics_path and dist.is_main:  # distributed: rank 0 writes
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(task, advance=1, loss=rec["loss"], skipped=skipped, tps=rec["tokens_per_s"])
            kill_point("step")  # tests of crash safety (FLEXI_TEST_KILL_AT); nothing otherwise
            done = step + 1
            if folder and (done % cfg.save_every == 0 or done == cfg.steps or done == stop_after):
                dist.on_main(save_training, fm, folder, cfg, done, opt, budget, None)  # others wait
            if stop_after is not None and done >= stop_after:
                return {"stopped_at": done}

    for p in params:
        p.requires_grad_(False)
    summary = {"steps": cfg.steps, "objective": cfg.objective, "data": cfg.data, "budget": cfg.budget,
               "router_init": cfg.router_init, "adapter_init": cfg.adapter_init}
    if heldout is not None:
        final = heldout_metrics(fm, heldout)
        summary["trained_threshold_skipped"] = final["mean_skipped_layers"]
        if cfg.calibrate and abs(final["mean_skipped_layers"] - cfg.skip_target) > 0.1:
            fm.config.threshold = fm.state.threshold = calibrate_threshold(fm, heldout, cfg.skip_target)
            final = heldout_metrics(fm, heldout)
        summary.update(final, threshold=fm.config.threshold)
        if fm.tokenizer is not None:
            from .data import heldout_prompts

            summary.update(greedy_agreement(fm, heldout_prompts(10)))
    for key in ("router_fit", "adapter_fit", "penalty_start"):  # from before step 0, possibly in an earlier process (--resume)
        if (fm.config.training or {}).get(key) is not None:
            summary[key] = fm.config.training[key]
    if folder:
        dist.on_main(save_training, fm, folder, cfg, cfg.steps, opt, budget, summary)
    return summary


_TRAIN_FIELDS = "loss {task.fields[loss]:.4f}  skipped {task.fields[skipped]:.2f}  {task.fields[tps]:.0f} tok/s"


def _progress(enabled: bool, label: str = "train", fields: str = _TRAIN_FIELDS):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(fields),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)
