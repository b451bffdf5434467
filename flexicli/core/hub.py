"""Checkpoints on the Hugging Face Hub: resolving a pushed checkpoint by id (downloaded and cached), and turning
what huggingface_hub raises into one line that says what to do.

The token is never handled here: huggingface_hub finds it itself (HF_TOKEN, or the file `hf auth login` writes).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from .errors import BadInput, CheckpointError, Failure, FlexiError


def looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def resolve_checkpoint(spec: str) -> Path:
    """A local checkpoint folder as it is; a Hub id (`user/name`) downloaded into the Hugging Face cache.
    Only the checkpoint's own files are fetched (an exported repo's base weights are not: the base comes from
    its own id, like every checkpoint's). With HF_HUB_OFFLINE=1 the cached copy is used."""
    if not looks_like_hub_id(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, "*.png"]))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all mean "cannot get it"
        raise CheckpointError(f"no checkpoint folder {spec!r} here, and it could not be fetched from the Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                              "check the id and your network, or pass a local folder") from e


def hub_error(e: Exception, repo_id: str | None) -> FlexiError:
    """One typed error for anything a Hub call raised. Bad input (exit 2): not logged in, a token the Hub
    rejects, a repo you may not write to. Failure (exit 1): no network, the Hub itself failing."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    repo = repo_id or "the repo"
    if isinstance(e, FlexiError):
        return e
    if isinstance(e, LocalTokenNotFoundError):
        return not_logged_in()
    if isinstance(e, OfflineModeIsEnabled):
        return Failure("HF_HUB_OFFLINE is set, so the Hub cannot be reached", "unset HF_HUB_OFFLINE to push")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return BadInput("the Hub rejected your token (401 Unauthorized)", "log in again: hf auth login")
        if status == 403:
            return BadInput(f"you may not write to {repo} (403 Forbidden): it belongs to someone else, or your "
                            "token is read-only", "push to a repo id in your own namespace, or use a write token")
        if status == 404:
            return BadInput(f"{repo} was not found on the Hub (404)", "check the repo id")
        return Failure(f"the Hub answered {status} for {repo}: {_first_line(e)}")
    if isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith(("httpx", "httpcore", "requests")):
        return Failure(f"could not reach the Hub at {constants.ENDPOINT} ({type(e).__name__})",
                       "check your network, or HF_ENDPOINT if you set it")
    return Failure(f"pushing to {repo} failed: {type(e).__name__}: {_first_line(e)}")


def not_logged_in() -> BadInput:
    return BadInput("not logged in to the Hugging Face Hub", "run `hf auth login`, or set HF_TOKEN")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
