"""push: a checkpoint folder (or an exported one) and a fresh model card to the Hub, in one commit.

    plan = plan_push("flexi-model")              # what would go up; no network
    result = push("flexi-model", "me/my-model")  # create the repo (exist_ok), then one commit with every file

The preservation check is part of the push: a checkpoint without a current verdict (none stored, or one made
on other weights or another router threshold) is evaluated first, exactly as `flexi eval` with its default
settings would, and the result is stored in its config and card. A failed verdict is refused unless force=True.

One commit means nothing is ever partially pushed: the Hub applies all files or none. Large files are uploaded
as LFS objects before the commit, but they are not part of the repo until the commit that names them lands.
The token is whatever huggingface_hub finds (HF_TOKEN or `hf auth login`); flexicli never reads it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.card import base_id, base_name, render_card
from ..core.checkpoint import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, FlexiConfig, read_config, weights_digest
from ..core.errors import BadInput, Failure
from .export import MODELING_FILE
from ..core.hub import hub_error, looks_like_hub_id, not_logged_in

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
    check: str | None = None  # why a real push would first run the check (no current verdict), None if not
    refusal: str | None = None  # why a real push would be refused (a current, failed verdict), None if not
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"repo_id": self.repo_id, "folder": str(self.folder), "exported": self.exported,
                "files": [{"path": p, "bytes": f.stat().st_size} for p, f in self.files]
                + [{"path": CARD_FILE, "bytes": len(self.card.encode())}],
                "check": self.check, "refused": self.refusal}


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
    plan.check = stale_reason(config, folder)
    if plan.check is None and config.eval["passed"] is False:
        from ..evaluation.evaluate import failed_checks

        failed = "; ".join(failed_checks(config.eval)) or "no threshold was measured"
        plan.refusal = f"its eval failed ({failed}); pass --force to push anyway"
    return plan


def stale_reason(config: FlexiConfig, folder: Path) -> str | None:
    """Why the stored verdict cannot be trusted for the checkpoint as it is now; None when it is current.
    Current means: a verdict, made on this weights file (its sha256, recorded by evaluate.store) at this
    router threshold. A verdict from before flexicli recorded the digest cannot be matched to weights."""
    ev = config.eval or {}
    if ev.get("passed") not in (True, False):
        return "it has no eval result"
    if not ev.get("weights_sha256"):
        return "its eval result does not record which weights it was made on"
    if ev["weights_sha256"] != weights_digest(folder):
        return "its weights changed after the eval"
    if ev.get("threshold") is not None and float(ev["threshold"]) != float(config.threshold):
        return f"its router threshold changed after the eval ({ev['threshold']} -> {config.threshold})"
    return None


def run_check(folder: str | Path, progress=None, device: str | None = None, **evaluate_options) -> dict:
    """The preservation check `flexi push` runs: load the checkpoint, evaluate() it (default settings unless
    evaluate_options say otherwise), store the result in its config and card as `flexi eval` does. Returns it."""
    from ..evaluation.evaluate import evaluate, store
    from ..core.flexi_model import FlexiModel

    folder = Path(folder)
    digest = weights_digest(folder)  # before loading: the verdict is about these bytes
    fm = FlexiModel.load(folder, device=device)
    if fm.tokenizer is None and "data" not in evaluate_options:
        raise BadInput(f"cannot check {folder} before pushing: its base model has no tokenizer, so the built-in "
                       "held-out texts cannot be read",
                       "store a verdict from Python: flexicli.evaluate.store(folder, evaluate(fm, data=[[ids]]))")
    result = evaluate(fm, progress=progress, **evaluate_options)
    result["data"] = "built-in held-out" if evaluate_options.get("data") is None else "given to run_check"
    store(folder, result, weights_sha256=digest)
    return result


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadInput(f"bad repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise BadInput(f"bad repo id {repo_id!r}", "use namespace/name, e.g. your-username/my-model")


def push(folder: str | Path, repo_id: str | None = None, private: bool = False, force: bool = False,
         progress=None, check_options: dict | None = None) -> dict:
    """Create the repo (if needed) and upload the folder and its card in one commit. Returns a summary.

    Without a current verdict the check runs first (run_check, with check_options; progress(stage, done, total)
    reports it and the upload); a failed verdict is refused unless force. force does not skip the check: the
    card that goes up always describes the weights that go up."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    plan = plan_push(folder, repo_id)  # checks the folder and the repo id before anything touches the network
    if get_token() is None:  # before the check, which takes minutes
        raise not_logged_in()
    checked = plan.check
    if checked:
        run_check(folder, progress=progress, **(check_options or {}))
        plan = plan_push(folder, repo_id)  # the card now shows the verdict
    if plan.refusal and not force:
        raise Failure(f"refusing to push {folder}: {plan.refusal}")
    api = HfApi()
    try:
        if repo_id is None:
            plan = plan_push(folder, user=api.whoami()["name"])
        if progress:
            progress("upload", 0, len(plan.files) + 1)
        url = api.create_repo(plan.repo_id, private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in plan.files]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=plan.card.encode()))
        info = api.create_commit(plan.repo_id, operations=ops, repo_type="model",
                                 commit_message=f"flexicli: {base_name(plan.config)}, skip target "
                                                f"{skip_target(plan.config)}")
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one typed line
        raise hub_error(e, plan.repo_id) from e
    if progress:
        progress("upload", len(ops), len(ops))
    return {**plan.summary(), "url": str(url), "commit": info.oid, "private": private, "forced": bool(plan.refusal),
            "checked": checked, "passed": plan.config.eval["passed"]}
