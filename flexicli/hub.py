"""Checkpoints on the Hugging Face Hub: resolving a pushed checkpoint by id (downloaded and cached)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from .errors import CheckpointError


def looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def resolve_checkpoint(spec: str) -> Path:
    """A local checkpoint folder as it is; a Hub id (`user/name`) downloaded into the Hugging Face cache."""
    if not looks_like_hub_id(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, "*.png"]))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all mean "cannot get it"
        raise CheckpointError(f"no checkpoint folder {spec!r} here, and it could not be fetched from the Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                              "check the id and your network, or pass a local folder") from e
