"""generate: a decode loop that knows, for every generated token, which layers processed it.

    lm = open_model("flexi-model")                      # or open_model(base="HuggingFaceTB/SmolLM2-135M")
    for tok in generate_tokens(lm, lm.encode("Hi"), max_new_tokens=32):
        print(tok.text, tok.layers_used, tok.skipped_layers)

Which decisions belong to which token: a decode step consumes token t (its hidden state goes through the
layers, and the routers decide per layer whether it runs) and produces token t+1. A token is shown with the
decisions of the step that *consumed* it: the layers used to process it, as FlexiDepth colours its figures.
So a token is yielded one step after it is sampled, and the last generated token gets one extra forward pass
(whose logits are thrown away). An end-of-sequence token is not shown and not processed.

Without a checkpoint (`open_model(base=...)`) or with `original=True`, the original layers run: every
token uses every layer.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..core.compat import cache_kwargs
from ..core.errors import BadInput
from ..core.routed_layer import is_threshold
from ..data.tokens import chat_ids, prompt_ids, stop_ids


@dataclass
class TokenLayers:
    """One generated token and the layers that processed it."""

    token_id: int
    text: str  # the characters this token adds to the decoded text (may be "" for half a UTF-8 character)
    layers_used: int | float  # decoder layers that ran for this token: the unrouted ones plus the routed ones it
    #                           ran; in layer-equivalents for skip units module/mlp (flexicli/core/units.py)
    skipped_layers: list[int]  # indices of the decoder layers it skipped (module/mlp: all of whose units it skipped)
    skipped_units: list[str] | None = None  # module/mlp only: the routed units it skipped ("17.attn", "17.mlp")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["skipped_units"] is None:  # skip unit `layer`: the layers say it all
            del d["skipped_units"]
        return d


@dataclass
class Generation:
    tokens: list[TokenLayers]
    num_layers: int
    routed_layers: list[int]
    stopped: str = "length"  # "eos" | "length"

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def mean_layers_used(self) -> float:
        return sum(t.layers_used for t in self.tokens) / len(self.tokens) if self.tokens else float(self.num_layers)

    @property
    def skipped_share(self) -> float:
        """Share of all decoder-layer computations (tokens x layers) that were skipped."""
        return 1.0 - self.mean_layers_used / self.num_layers

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": [t.to_dict() for t in self.tokens],
                "mean_layers_used": self.mean_layers_used, "skipped_share": self.skipped_share,
                "num_layers": self.num_layers, "routed_layers": self.routed_layers, "stopped": self.stopped}


@dataclass
class Sampling:
    """Greedy by default; temperature > 0 samples (with top-p nucleus filtering), seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    def check(self) -> "Sampling":
        if self.temperature < 0:
            raise BadInput(f"--temperature must be >= 0, not {self.temperature}", "0 means greedy")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"--top-p must be in (0, 1], not {self.top_p}")
        return self

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def pick(self, logits: torch.Tensor) -> int:
        """logits: [vocab] for the next position."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        if self._gen is None:
            self.reset()
        return int(torch.multinomial(probs, 1, generator=self._gen))


class LayerModel:
    """What generation runs: a Hugging Face causal LM, and the FlexiModel that routes it (None = no checkpoint)."""

    def __init__(self, model, tokenizer=None, flexi=None, source: str = "?"):
        self.model = model
        self.tokenizer = tokenizer
        self.flexi = flexi
        self.source = source
        cfg = model.config
        self.num_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
        self.routed_layers = list(flexi.config.routed_layers) if flexi is not None else []
        self.unit_keys = list(flexi.unit_keys) if flexi is not None else []  # = routed_layers for skip unit `layer`
        self.unit_costs = list(flexi.unit_costs) if flexi is not None else []
        self.capacity = flexi.capacity if flexi is not None else 0  # most layer-equivalents a token can skip

    @classmethod
    def from_flexi(cls, fm, source: str | None = None) -> "LayerModel":
        return cls(fm.model, fm.tokenizer, fm, source or str(fm.path or fm.config.base_model))

    @property
    def threshold(self) -> float | None:
        return self.flexi.state.threshold if self.flexi is not None else None

    # ---- text <-> ids -----------------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise BadInput(f"{self.source} has no tokenizer", "its base model folder needs tokenizer files")
        return self.tokenizer

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """The prompt as the user's message through the chat template when the tokenizer has one (chat=None),
        or as raw text to continue (chat=False)."""
        return prompt_ids(self._need_tokenizer(), prompt, chat)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise BadInput(f"the tokenizer of {self.source} has no chat template", "pass a PROMPT with --raw")
        return chat_ids(tok, messages)

    def stop_ids(self) -> set[int]:
        return stop_ids(self.model, self.tokenizer)

    def decoder(self) -> "Detokenizer":
        tok = self._need_tokenizer()
        return Detokenizer(lambda ids: tok.decode(ids, skip_special_tokens=True))


class Detokenizer:
    """Turns a stream of ids into text pieces whose concatenation is the decoded text. Decoding the growing
    prefix (not each id alone) keeps spaces and multi-byte characters right; a token that ends in half a
    UTF-8 character yields "" and the next token carries the whole character."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def open_model(model_dir: str | None = None, base: str | None = None, device: str | None = None,
               dtype: str | None = None) -> LayerModel:
    """A checkpoint folder or Hub id (`model_dir`), or a plain base model (`base`: Hub id, folder, .gguf file,
    'embedded' for the embedded SmolLM2). A local `model_dir` that is a base model rather than a checkpoint
    (a .gguf file, or a folder with config.json and no flexi_config.json) is opened as a base model too."""
    from ..core.base_model import EMBEDDED, load_base
    from ..core.checkpoint import CONFIG_FILE
    from ..core.errors import CheckpointError
    from ..core.flexi_model import FlexiModel

    if base is None and model_dir is not None:
        p = Path(model_dir).expanduser()
        if (p.is_file() and p.suffix == ".gguf") or ((p / "config.json").is_file() and not (p / CONFIG_FILE).is_file()):
            base = model_dir
    if base is not None:
        spec = None if base in ("embedded", EMBEDDED) else base
        model, tokenizer, info = load_base(spec, dtype=dtype, device=device)
        return LayerModel(model, tokenizer, None, info.base_model)
    try:
        fm = FlexiModel.load(model_dir, device=device, dtype=dtype)
    except CheckpointError as e:
        if "not a flexicli checkpoint" in str(e):  # e.g. the Hub id of a base model
            raise CheckpointError(str(e), f"to run a base model without a checkpoint: --base {model_dir}") from None
        raise
    return LayerModel.from_flexi(fm, str(model_dir))


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not is_threshold(threshold):
        raise BadInput(f"--threshold must be in [0, 1], not {threshold}",
                       "the router gate is a sigmoid: a token runs a layer iff its gate > threshold")


def generate_tokens(lm: LayerModel, prompt_ids: list[int], max_new_tokens: int = 256,
                    sampling: Sampling | None = None, threshold: float | None = None, original: bool = False,
                    stop_ids: Iterable[int] | None = None, decode: Callable[[list[int]], str] | None = None,
                    stats: Generation | None = None) -> Iterator[TokenLayers]:
    """Yields each generated token as soon as its own decisions are known (one step after it is sampled).

    original=True runs the original layers (routing off). `decode` turns ids into text (default: the
    tokenizer). `stats`, when given, receives `stopped` ("eos" | "length")."""
    if not prompt_ids:
        raise BadInput("the prompt is empty")
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    check_threshold(threshold)
    sampling = (sampling or Sampling()).check()
    sampling.reset()
    stop = set(lm.stop_ids() if stop_ids is None else stop_ids)
    detok = Detokenizer(decode) if decode is not None else lm.decoder()
    routed = lm.unit_keys if (lm.flexi is not None and not original) else []  # routed layers, or units
    device = next(lm.model.parameters()).device

    # The routing knobs and the recording stay set while the generator runs (between yields too); inference
    # mode is entered per forward pass only, so the caller's own code between tokens runs as usual.
    with ExitStack() as stack:
        recording = None
        if lm.flexi is not None:
            stack.enter_context(lm.flexi.routing("full" if original else None, threshold=threshold))
            if routed:
                recording = stack.enter_context(lm.flexi.record())
        from transformers import DynamicCache

        cache = DynamicCache()

        def forward(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Logits of the last position, and the decisions [len(ids), n_routed] for the consumed ids."""
            before = len(recording.raw) if recording is not None else 0
            with torch.inference_mode():
                out = lm.model(input_ids=torch.tensor([ids], device=device), **cache_kwargs(lm.model, cache), use_cache=True)
            ran = None
            if recording is not None:
                step = recording.raw[before:]
                if [i for i, _ in step] != routed:
                    raise RuntimeError(f"expected one decision per routed unit {routed}, got {[i for i, _ in step]}")
                ran = torch.stack([mask[0] for _, mask in step], dim=-1).cpu()
            return out.logits[0, -1], ran

        def layers_of(token_id: int, ran: torch.Tensor | None) -> TokenLayers:
            skipped = [] if ran is None else [key for key, r in zip(routed, ran[-1].tolist()) if not r]
            if not routed or isinstance(routed[0], int):  # skip unit `layer`
                return TokenLayers(token_id, detok.push(token_id), lm.num_layers - len(skipped), skipped)
            from ..core.units import unit_label

            cost = dict(zip(lm.unit_keys, lm.unit_costs))
            saved = sum(cost[k] for k in skipped)
            whole = sorted({i for i, _ in skipped if all(k in skipped for k in routed if k[0] == i)})
            return TokenLayers(token_id, detok.push(token_id), round(lm.num_layers - saved, 4), whole,
                               [unit_label(k) for k in skipped])

        logits, _ = forward(list(prompt_ids))
        token = sampling.pick(logits)
        for n in range(1, max_new_tokens + 1):
            if token in stop:
                if stats is not None:
                    stats.stopped = "eos"
                return
            logits, ran = forward([token])  # consumes `token`: these decisions are its own
            yield layers_of(token, ran)
            token = sampling.pick(logits) if n < max_new_tokens else None
        if stats is not None:
            stats.stopped = "length"


def generate(lm: LayerModel, prompt_ids: list[int], max_new_tokens: int = 256, sampling: Sampling | None = None,
             threshold: float | None = None, original: bool = False,
             on_token: Callable[[TokenLayers], None] | None = None, **kw) -> Generation:
    """Runs generate_tokens to the end; `on_token` sees each token as it comes (for streaming output)."""
    result = Generation([], lm.num_layers, [] if original else lm.routed_layers)
    for tok in generate_tokens(lm, prompt_ids, max_new_tokens, sampling, threshold, original, stats=result, **kw):
        result.tokens.append(tok)
        if on_token is not None:
            on_token(tok)
    return result


def generation_divergence(a: Generation, b: Generation) -> int | None:
    """Index of the first generated token where the two differ (evaluate.first_divergence); None: identical,
    length included."""
    from ..evaluation.evaluate import first_divergence

    ids_a, ids_b = [t.token_id for t in a.tokens], [t.token_id for t in b.tokens]
    return None if ids_a == ids_b else first_divergence(ids_a, ids_b)


# ---- colour scale: shared by the terminal (`--show-layers`) and the HTML report of `flexi patterns` ----------
# Few layers (cheap tokens) are blue, many layers (hungry tokens) red.
DEPTH_STOPS = ["#3b82f6", "#22c55e", "#eab308", "#f97316", "#ef4444"]


def depth_colour(layers_used: int, fewest: int, most: int) -> str:
    """'#rrggbb' for a token that used `layers_used` layers, on the scale fewest..most (the model's range:
    unrouted layers only .. every layer)."""
    x = 1.0 if most <= fewest else min(1.0, max(0.0, (layers_used - fewest) / (most - fewest)))
    pos = x * (len(DEPTH_STOPS) - 1)
    i = min(int(pos), len(DEPTH_STOPS) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in DEPTH_STOPS[i:i + 2])
    f = pos - i
    return "#" + "".join(f"{round(p + (q - p) * f):02x}" for p, q in zip(a, b))


def layer_range(lm: LayerModel) -> tuple[int, int]:
    """(fewest, most) layers a token can use on this model (layer-equivalents: units.py)."""
    if lm.flexi is not None and lm.unit_keys != lm.routed_layers:  # skip units module / mlp
        return round(lm.num_layers - lm.capacity, 4), lm.num_layers
    return lm.num_layers - len(lm.routed_layers), lm.num_layers
