"""What a training run is: TrainConfig (every knob, with the measured reason for its default) and the recipes
that ship inside the package (flexicli/train/recipes/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..core.errors import BadInput
from .budget import BUDGETS
from .router_init import MEASURES

SOURCE_SPREAD = 0.03  # source_spread's default where it applies (TrainConfig.resolved)
TOP1_WEIGHT = 0.5  # top1_weight's default under distillation (TrainConfig.top1)


@dataclass
class TrainConfig:
    skip_target: float
    # with the other defaults (28 of SmolLM2-135M's 30 layers routed, the penalty started at its balance): measured
    # at 180 steps on two seeds, code f048813 (docs/results.md): flexi eval KL / top-1 / retention on 336 items
    # 0.136 / 0.851 / 1.064 and 0.112 / 0.873 / 1.034, both passed; 140 steps at 0221fd2 passed seed 1 by 0.010 on
    # retention. 160 since 180 steps, timed alone on 2 CPU cores at 174892f, took 64.5 min (convert + train, data
    # preparation included) against the 60-minute budget; 160 took 58.7 min at cf87fd1 and passed (seed 0: 0.140 /
    # 0.841 / 1.063)
    steps: int = 160
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    # adapters; routers get lr * router_lr_scale. Measured on SmolLM2, N = 4 (docs/results.md): at 2e-3 every run
    # of 8 on a GPU had late loss spikes and one seed diverged; at 1e-3 none did, and two CPU seeds ended at flexi
    # eval KL 0.242 / 0.243 against 0.272 / 0.297
    lr: float = 1e-3
    adam_beta2: float = 0.999  # AdamW's second-moment decay: lower answers a burst of large gradients sooner
    router_lr_scale: float = 0.15  # a router's decision is a cliff: small steps keep tokens from flipping en masse
    margin_weight: float | None = None  # > 0: push gates off the threshold (objectives.gate_margin); None: see `margin`
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    seed: int = 0
    data: str = "mix"  # mix (selfgen + docs) | selfgen | prompts | docs | PATH (.jsonl/.txt) | Hub dataset id
    objective: str = "kl"  # kl (distillation, ours) | lm (FlexiDepth: LM loss + alpha * mean_t (sum_l w)^2)
    alpha: float = 1e-3  # FlexiDepth's penalty weight (objective lm only)
    # objective kl: + hidden_weight * the per-layer hidden-state term (objectives.hidden_loss: relative squared
    # distance between student and teacher leaving each routed layer). The teacher cache then keeps each routed
    # layer's output too: on SmolLM2 ~8.8 MB per 256-token row reached (~5 GB over a default run). 0: KL alone.
    # Measured at 1.0 on SmolLM2, N = 4, / 8 adapters, seed 0 (docs/results.md): no mid-run spike, but flexi eval
    # KL / top-1 0.204 / 0.797 against 0.186 / 0.823 with KL alone, answers the same: so off
    hidden_weight: float = 0.0
    # objective kl: the KL at the position predicting an assistant answer's k-th token weighs 1 + answer_weight *
    # 0.5**k (objectives.answer_weights; chat rows only, found by the chat template's assistant header). 0: every
    # token alike. Measured at 8 on SmolLM2, N = 4, seed 0 (docs/results.md): the first answer token's top-1 0.655
    # against 0.667, flexi eval top-1 0.794 against 0.815: so off
    answer_weight: float = 0.0
    # objective kl: + top1_weight * the cross-entropy toward the original's top token at the positions where the routed
    # model's top token differs (objectives.distill_loss; the logged loss then includes it). Why: flexi eval's top-1
    # agreement counts flips at the original's near-ties, which cost the KL almost nothing (benchmarks/
    # top1_margin_probe.py: 62-66% of the disagreements without it sit at a margin p1 - p2 < 0.1). Measured at 0.5 on
    # SmolLM2, N = 4, / 8 (docs/results.md): flexi eval KL / top-1 0.085 / 0.889 and 0.081 / 0.895 on seeds 0 / 1
    # against 0.091 / 0.877 and 0.090 / 0.883 without, no cost in the step; 1.0 on seed 0: 0.082 / 0.893. 0: off;
    # None: TOP1_WEIGHT under objective kl, else 0 (see `top1`)
    top1_weight: float | None = None
    # the top-1 term also where the routed model picks the original's top token but leads with it by less than
    # top1_lead (logit gap to its next token, nats): 30% of the default's held-out disagreements sit where the original
    # leads by 0.10-0.40 in probability, not at near-ties (top1_margin_probe.py). 0: misses only
    top1_lead: float = 0.0
    budget: str = "penalty"  # penalty: PI-controlled Lagrange term | capacity: per-unit shares (budget.BudgetCapacity) | threshold: quantile
    #                          | density: per-unit target density (budget.BudgetDensity)
    # influence: fit the routers to token-level unit influence first (router_init.py) | cost: to the measured KL cost
    # of skipping each unit per token (adapters fitted first; a forward pass per routed unit over 1,024 tokens)
    # | blend: to both ranks averaged (router_init.py); measured at b99cb09 / e7cd863: Gemma N = 2 (60 steps) passes
    # flexi eval on two seeds where influence fails (the recipe gemma3-270m-cpu), SmolLM2 N = 4 fails retention
    # (0.717), so not the default
    # | none: fresh routers. cost, measured at 500e1b6 (docs/results.md): Gemma N = 2 keeps 17 of 22 factual answers
    # (influence: 9) at the same task retention; SmolLM2 N = 4 validation KL 0.071 against 0.100, but 3.35 layers
    # skipped on flexi eval's held-out text and 2.97 on docstrings (target 4): the budget does not hold, so the
    # default stays influence
    router_init: str = "influence"
    adapter_init: str = "fit"  # fit: fitted to the update it replaces before step 0 (adapter_init.py) | none: fresh adapters (add nothing)
    # penalty budget with warm-started routers: zero: lambda starts at 0 | balance: where the losses balance
    # (loop.penalty_balance). Why balance: from zero the count dips then overshoots (the PI rule's cycle) and the
    # 28-routed default at 140 steps went wrong from step 32; from the balance, two seeds at 140 steps had validation
    # KL falling at every evaluation, to 0.143 and 0.125 (docs/results.md). On 15 routed layers (no rollback then)
    # it was better at step 60 but ended worse after a loss spike at step 117
    penalty_start: str = "balance"
    # the most of the tokens one routed unit may skip, in the router warm start and as a hinge in training
    # (router_init.target_logits, objectives.skip_cap_loss); 1: no cap. Why: with the warm starts the routers settle
    # on skipping layers 15-17 for ~100% of tokens (static removal), which no token that needs them can escape.
    # Measured at 0.5 on SmolLM2, N = 4, seed 0 (docs/results.md): held-out KL 0.553 at step 60 against 0.273
    # uncapped, task answers no better; so off
    max_skip_share: float = 1.0
    # objective kl: + row_spread * the variance of the rows' own skipped counts in a micro-batch (objectives.
    # row_spread; mean-neutral: the budget still sets the mean). Why: the budget holds the batch's mean, and at N = 8
    # the routers spent it on conversations (7.96 skipped) while documentation skipped 6.20. Measured at 0.1 (N = 8,
    # seed 0, docs/results.md): stdlib docstrings 7.85 skipped against 6.64, but task retention 0.619 against 0.934:
    # so off
    row_spread: float = 0.0
    # objective kl, data mix: + source_spread * the variance between the micro-batch's two sources (conversations,
    # documentation) of the rows' skipped counts (objectives.source_spread; mean-neutral). Why: without it, at N = 8
    # the routers spent the budget on conversations and stdlib docstrings skipped 6.64 (the issue: +/-1 on text of
    # another kind); row_spread above evens every row and cost the tasks. Measured at 160 steps, two seeds each
    # (docs/results.md): 0.03 (the default since 2026-12-05): N = 8 docstrings 7.30 / 7.38, flexi eval KL / top-1 /
    # retention 0.289 / 0.752 / 0.857 and 0.290 / 0.759 / 0.797; N = 4 both passed (0.138 / 0.839 / 1.045, 0.114 /
    # 0.863 / 1.018), docstrings 3.37 / 3.51. 0.1 (the default before): N = 8 docstrings 7.82 / 7.86 but retention
    # 0.759 / 0.746 (0.934 without, 180 steps). None: SOURCE_SPREAD where the rows carry their source (objective kl
    # with the built-in data mix, or train(source=...)), else 0 (off)
    source_spread: float | None = None
    ramp: float | None = None  # share of the steps over which the skip target ramps up from 0; None: 0 when the routers are warm-started (they skip about the target from step 0), else 0.3
    # > 0: an evaluation whose validation KL is more than this multiple of the best so far sends training back to
    # the best weights, at half the learning rate (re-warmed over `warmup` steps, Adam's moments reset, the budget's
    # state of that evaluation); needs the selection (select). Why: the default at 150 steps diverged after step 60
    # (validation KL 0.208 at step 60, 2.80 at 120; docs/results.md). It cannot help a run that is never good: the
    # one full run with it (140 steps) was already in the budget's cycle at its first evaluation. 0: off
    rollback: float = 2.0
    # steps between evaluations: each costs 45-75 s on 2 threads (a threshold search, then the metrics), and a
    # divergence is caught within this many steps. 30 until 180 steps ran over the hour (6 evaluations: ~450 s)
    eval_every: int = 40
    eval_rows: int = 16  # validation conversations (held-out ones without them), one a row, per mid-run evaluation
    save_every: int = 60
    # measured: peak RSS 1.12x the frozen model's, against 1.60x without (docs/results.md, Training memory)
    gradient_checkpointing: bool = True
    calibrate: bool = True  # after training, nudge the threshold so held-out mean skipped == target
    selfgen_tokens: int = 96
    # data selfgen/mix: this many instructions in the task suite's formats, made from package documentation
    # (text.task_prompts), answered by the original model beside the template prompts. 0: none. Measured at 400 on
    # SmolLM2, N = 4, seed 0: worse on every figure (flexi eval KL 0.251 / top-1 0.763 / retention 0.639 against
    # 0.242 / 0.787 / 0.691) and 19 min more data preparation on 1 thread, so it stays off
    task_prompts: int = 0
    # data selfgen/mix: this many short factual questions (text.fact_prompts: capitals, languages, animals, counts,
    # none a task-suite item) with the original model's answers (FACT_TOKENS each) beside the template prompts. 0:
    # none. Why: on Gemma-3-270M at N = 4 the routers skip layer 8 for every token, the cheapest by KL on
    # conversations and documentation, and its factual answers go with it (task retention 0.597; layer 8 alone
    # 0.578, docs/results.md). Measured at 236 (all) on Gemma, N = 4, 160 steps: the routers still skipped layer 8
    # for 99% of tokens, flexi eval KL / top-1 / retention 0.178 / 0.888 / 0.516, docstrings 2.93 skipped: so off
    fact_prompts: int = 0
    docs_chars: int = 1_500_000  # data docs/mix: characters of package documentation (~4 per token)
    # > 0: the checkpoint holds an exponential moving average of the trained weights (loop.ema_decay); 0: the last
    # step's weights. Measured on SmolLM2, N = 4, two seeds (docs/results.md): flexi eval KL 0.297 against 0.391 on
    # the seed whose last steps went wrong, 0.272 against 0.260 on the other; top-1 the same
    ema: float = 0.97
    # the checkpoint holds the weights (the average, with ema) that did best on the validation prompts at the
    # evaluations (every eval_every steps and the last), each scored at the threshold that skips the target there;
    # needs validation rows (data selfgen, mix) and calibration.
    # Why: the default run at 95325b9 stood at held-out KL 0.237 at step 120 and 0.286 at step 180
    select: bool = True
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
        if self.router_init not in (*MEASURES, "none"):
            raise BadInput(f"router_init must be 'influence', 'cost', 'blend' or 'none', not {self.router_init!r}")
        if self.penalty_start not in ("balance", "zero"):
            raise BadInput(f"penalty_start must be 'balance' or 'zero', not {self.penalty_start!r}")
        if not 0 < self.max_skip_share <= 1:
            raise BadInput(f"max_skip_share must be in (0, 1], not {self.max_skip_share}", "1 turns the cap off")
        if self.max_skip_share < 1 and self.objective != "kl":
            raise BadInput(f"max_skip_share applies to objective kl, not {self.objective!r}", "drop it or use kl")
        # the distillation-only loss terms: a weight >= 0, and none under FlexiDepth's LM objective
        for name, off in (("hidden_weight", "0 turns the term off"), ("row_spread", "0 turns the term off"),
                          ("answer_weight", "0 weighs every token alike"), ("top1_weight", "0 turns the term off")):
            value = getattr(self, name)
            if value is None:  # top1_weight's default: on where it applies (TrainConfig.top1)
                continue
            if value < 0:
                raise BadInput(f"{name} must be at least 0, not {value}", off)
            if value and self.objective != "kl":
                raise BadInput(f"{name} applies to objective kl, not {self.objective!r}", "drop it or use kl")
        if self.top1_lead < 0:
            raise BadInput(f"top1_lead must be at least 0, not {self.top1_lead}", "0 applies the term to misses only")
        if self.top1_lead and not self.top1:
            raise BadInput("top1_lead widens the top-1 term, which is off (top1_weight 0 or objective lm)",
                           "drop top1_lead or set top1_weight above 0")
        if self.source_spread is not None and self.source_spread < 0:
            raise BadInput(f"source_spread must be at least 0, not {self.source_spread}", "0 turns the term off")
        if self.source_spread and (self.objective != "kl" or self.data != "mix"):
            raise BadInput(f"source_spread applies to objective kl with data mix, not {self.objective!r} with "
                           f"{self.data!r}", "drop it, or use objective kl and data mix")
        if self.task_prompts < 0:
            raise BadInput(f"task_prompts must be at least 0, not {self.task_prompts}")
        if self.task_prompts and self.data not in ("selfgen", "mix"):
            raise BadInput(f"task_prompts are answered by the original model: data selfgen or mix, not {self.data!r}")
        if self.fact_prompts < 0:
            raise BadInput(f"fact_prompts must be at least 0, not {self.fact_prompts}")
        if self.fact_prompts and self.data not in ("selfgen", "mix"):
            raise BadInput(f"fact_prompts are answered by the original model: data selfgen or mix, not {self.data!r}")
        if self.fact_prompts:
            from ..data.text import fact_prompts

            fact_prompts(self.fact_prompts)  # more than the built-in questions: refused before the model loads
        if not 0.0 < self.adam_beta2 < 1.0:
            raise BadInput(f"adam_beta2 must be in (0, 1), not {self.adam_beta2}")
        if not 0.0 <= self.ema < 1.0:
            raise BadInput(f"ema must be in [0, 1), not {self.ema}", "0 turns the weight average off")
        if self.rollback < 0 or 0 < self.rollback <= 1:
            raise BadInput(f"rollback must be 0 (off) or above 1, not {self.rollback}",
                           "it is a multiple of the best validation KL so far")
        if self.adapter_init not in ("fit", "none"):
            raise BadInput(f"adapter_init must be 'fit' or 'none', not {self.adapter_init!r}")

    def resolved(self, has_source: bool) -> "TrainConfig":
        """This config with the defaults that depend on the run filled in, so the stored settings say what ran:
        source_spread on (SOURCE_SPREAD) where the training rows carry their source (`has_source`: the built-in data
        mix, or rows given with theirs) under distillation, else off; top1_weight as `top1`, margin_weight as
        `margin`. A value set by hand is kept (and check() refuses it where it cannot apply)."""
        spread = self.source_spread
        if spread is None:
            spread = SOURCE_SPREAD if has_source and self.objective == "kl" else 0.0
        return replace(self, source_spread=spread, top1_weight=self.top1, margin_weight=self.margin)

    @property
    def margin(self) -> float:
        """The margin weight in effect. Under per-layer capacities the margin is what makes the one inference
        threshold reproduce the trained decisions (objectives.gate_margin): 0.05. With warm-started routers under the
        penalty, 0.03 keeps the gates from bunching at the threshold (measured: docs/results.md, "Penalty against
        capacity"). With fresh routers it stays off: there it made whole routers cross the threshold at once."""
        if self.margin_weight is not None:
            return self.margin_weight
        if self.budget == "capacity":
            return 0.05
        return 0.03 if self.warm_start and self.budget == "penalty" else 0.0

    @property
    def top1(self) -> float:
        """The top1_weight in effect: as set, else TOP1_WEIGHT under distillation and 0 under FlexiDepth's LM
        objective (where check() refuses a weight set by hand)."""
        if self.top1_weight is not None:
            return self.top1_weight
        return TOP1_WEIGHT if self.objective == "kl" else 0.0

    @property
    def warm_start(self) -> bool:
        """Routers are fitted before training (distillation only: FlexiDepth's objective starts from scratch)."""
        return self.router_init in MEASURES and self.objective == "kl"


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"  # inside the package: an installed wheel has them too


def load_recipe(name_or_file: str, section: str = "train") -> dict:
    """A recipe's training settings (its `train:` section, or the whole file when it has none); section="convert"
    gives the checkpoint settings it was measured with (e.g. adapter_reduction), {} when it names none."""
    import yaml

    path = Path(name_or_file)
    if not path.is_file():
        path = recipes_dir() / f"{name_or_file}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
        raise BadInput(f"no recipe or config file {name_or_file!r}", f"recipes: {', '.join(known)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a mapping of settings", "e.g. `steps: 160` on a line, or a `train:` section")
    if section == "convert":
        return data.get("convert") or {}
    if "train" in data:
        return data["train"] or {}
    # a flat file of training settings may still name its checkpoint (convert:), which is not a training setting
    return {k: v for k, v in data.items() if k != "convert"}
