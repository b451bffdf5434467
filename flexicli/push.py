"""push: a checkpoint folder (or an exported one) and a fresh model card to the Hub, in one commit.

    plan = plan_push("flexi-model")              # what would go up; no network
    result = push("flexi-model", "me/my-model")  # create the repo (exist_ok), then one commit with every file

One commit means nothing is ever partially pushed: the Hub applies all files or none. Large files are uploaded
as LFS objects before the commit, but they are not part of the repo until the commit that names them lands.
The token is whatever huggingface_hub finds (HF_TOKEN or `hf auth login`); flexicli never reads it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .card import base_id, base_name, render_card
from .checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, FlexiConfig, read_config
from .errors import BadInput
from .export import MODELING_FILE
from .hub import hub_error, looks_like_hub_id, not_logged_in

_USER_PLACEHOLDER = "<your-username>"


@dataclass
class PushPlan:
    folder: Path
    config: FlexiConfig
    repo_id: str
    files: list[tuple[str, Path]]  # (path in the repo, local file); the card is added on top
    figures: list[str]
    exported: bool
    card: str = ""
    refusal: str | None = None  # why a real push would be refused (no passing eval), None when it may go
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"repo_id": self.repo_id, "folder": str(self.folder), "exported": self.exported,
                "files": [{"path": p, "bytes": f.stat().st_size} for p, f in self.files]
                + [{"path": CARD_FILE, "bytes": len(self.card.encode())}],
                "refused": self.refusal}


def skip_target(config: FlexiConfig):
    n = (config.training or {}).get("skip_target", 0) or 0
    return int(n) if float(n).is_integer() else n


def default_repo_id(config: FlexiConfig, user: str) -> str:
    """`<user>/<base name>-flexi-skip<N>`, N the training's skip target (0 when untrained)."""
    name = f"{base_name(config)}-flexi-skip{skip_target(config)}"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")[:96]
    return f"{user}/{name}"


def _files(folder: Path, exported: bool) -> list[tuple[str, Path]]:
    """The checkpoint's own files (config, weights, figures); an exported folder goes up whole. Other files a
    checkpoint folder may hold (training state for --resume, logs) stay home. The card is rendered afresh."""
    if exported:
        picked = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    else:
        picked = [folder / CONFIG_FILE, folder / WEIGHTS_FILE] + _figure_files(folder)
    out = []
    for p in picked:
        rel = p.relative_to(folder).as_posix()
        if rel == CARD_FILE or any(part.startswith(".") for part in rel.split("/")):
            continue  # our temporaries and hidden files never go up
        out.append((rel, p))
    return out


def _figure_files(folder: Path) -> list[Path]:
    """PNG figures in the folder or one level down (where `flexi patterns -o DIR/patterns` leaves them)."""
    return sorted(p for p in [*folder.glob("*.png"), *folder.glob("*/*.png")] if p.is_file())


def plan_push(folder: str | Path, repo_id: str | None = None, user: str | None = None) -> PushPlan:
    """Everything about a push that needs no network: files, card, repo id, and whether it would be refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"no checkpoint folder at {folder}", "push takes a local folder: pass -m/--model")
    config = read_config(folder)
    if repo_id is not None:
        _check_repo_id(repo_id)
    exported = (folder / MODELING_FILE).is_file()
    files = _files(folder, exported)
    figures = [rel for rel, p in files if p.suffix == ".png"]
    plan = PushPlan(folder, config, repo_id or default_repo_id(config, user or _USER_PLACEHOLDER), files, figures,
                    exported)
    plan.card = render_card(config, figures=figures, repo_id=plan.repo_id, exported=exported)
    if not looks_like_hub_id(base_id(config)):
        plan.notes.append(f"the base model is a local path ({base_id(config)}): others can load this checkpoint only "
                          "with the same base at that path (convert from a Hub id to share it)")
    ev = config.eval or {}
    if ev.get("passed") is not True:
        plan.refusal = ("its eval failed" if ev.get("passed") is False else "it has no eval result") + \
            f" (run `flexi eval -m {folder}` first, or pass --force to push anyway)"
    return plan


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadInput(f"bad repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise BadInput(f"bad repo id {repo_id!r}", "use namespace/name, e.g. your-username/my-model")


def push(folder: str | Path, repo_id: str | None = None, private: bool = False, force: bool = False) -> dict:
    """Create the repo (if needed) and upload the folder and its card in one commit. Returns a summary."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    plan = plan_push(folder, repo_id)  # checks the folder and the repo id before anything touches the network
    if plan.refusal and not force:
        raise BadInput(f"refusing to push {folder}: {plan.refusal}")
    if get_token() is None:
        raise not_logged_in()
    api = HfApi()
    try:
        if repo_id is None:
            plan = plan_push(folder, user=api.whoami()["name"])
        url = api.create_repo(plan.repo_id, private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in plan.files]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=plan.card.encode()))
        info = api.create_commit(plan.repo_id, operations=ops, repo_type="model",
                                 commit_message=f"flexicli: {base_name(plan.config)}, skip target "
                                                f"{skip_target(plan.config)}")
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one typed line
        raise hub_error(e, plan.repo_id) from e
    return {**plan.summary(), "url": str(url), "commit": info.oid, "private": private, "forced": bool(plan.refusal)}
