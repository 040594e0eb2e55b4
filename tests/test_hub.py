"""core.hub / core.catalog against a real HTTP server on 127.0.0.1 that speaks the Hub's API.

HF_ENDPOINT points huggingface_hub at it, so the real client code runs (no patched functions).
The endpoints are the ones huggingface_hub 2.x calls (read in its hf_api.py / file_download.py):
  GET  /api/models?search=&pipeline_tag=&sort=&limit=&expand=   list_models
  GET  /api/models/{owner}/{name}                                 model_info
  HEAD /{owner}/{name}/resolve/main/config.json                   hf_hub_download's metadata
       (needs X-Repo-Commit and ETag headers), then GET for the bytes.
Errors as the Hub sends them: X-Error-Code GatedRepo with 401 (no token) or 403 (token without
access), RepoNotFound with 404, EntryNotFound with 404.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from core import catalog, hub
from core.errors import UserError
from tui.cli import main

COMMIT = "a" * 40
SECRET = "hf_secret_test_token_5cf1"

QWEN_CFG = {  # Qwen/Qwen2.5-0.5B's real config.json numbers
    "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
    "tie_word_embeddings": True, "max_position_embeddings": 32768,
}
MODELS = {
    # a non-catalog id with a real config: resolve_model must go to the Hub for it
    "acme/qwen-clone-0.5b": {"downloads": 500, "likes": 7, "lastModified": "2025-03-01T10:00:00.000Z",
                             "params": 494032768, "config": QWEN_CFG, "gated": False},
    "acme/popular-1b": {"downloads": 90000, "likes": 3, "lastModified": "2024-01-01T10:00:00.000Z",
                        "params": 1_100_000_000, "config": dict(QWEN_CFG, hidden_size=2048), "gated": False},
    "acme/liked-2b": {"downloads": 10, "likes": 900, "lastModified": "2023-06-01T10:00:00.000Z",
                      "params": 2_000_000_000, "config": None, "gated": False},  # no config.json
    "acme/gated-3b": {"downloads": 40, "likes": 40, "lastModified": "2025-06-01T10:00:00.000Z",
                      "params": 3_000_000_000, "config": QWEN_CFG, "gated": "manual"},
    "acme/weird-arch": {"downloads": 1, "likes": 1, "lastModified": "2022-01-01T10:00:00.000Z",
                        "params": 300_000_000,
                        "config": {"model_type": "mamba2", "hidden_size": 1024, "num_hidden_layers": 24,
                                   "num_attention_heads": 16, "vocab_size": 50280}, "gated": False},
}


def _info(mid: str) -> dict:
    m = MODELS[mid]
    return {
        "id": mid, "downloads": m["downloads"], "likes": m["likes"], "lastModified": m["lastModified"],
        "gated": m["gated"], "pipeline_tag": "text-generation", "private": False,
        "safetensors": {"parameters": {"BF16": m["params"]}, "total": m["params"]},
    }


class FakeHub(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200, headers=None):
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status, code, message="error"):
        self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        FakeHub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        authed = self.headers.get("Authorization") == f"Bearer {SECRET}"
        if url.path == "/api/models":
            qs = parse_qs(url.query)
            text = (qs.get("search") or [""])[0].lower()
            items = [_info(m) for m in MODELS if text in m.lower()]
            key = {"downloads": "downloads", "likes": "likes", "lastModified": "lastModified"}[(qs.get("sort") or ["downloads"])[0]]
            items.sort(key=lambda d: d[key], reverse=True)
            limit = int((qs.get("limit") or ["100"])[0])
            return self._json(items[:limit])
        if url.path.startswith("/api/models/"):
            mid = url.path[len("/api/models/"):]
            if mid not in MODELS:
                return self._error(404, "RepoNotFound", "Repository not found")
            return self._json(_info(mid))
        parts = url.path.strip("/").split("/")
        if len(parts) == 5 and parts[2] == "resolve":
            mid, filename = "/".join(parts[:2]), parts[4]
            if mid not in MODELS:
                return self._error(401, "RepoNotFound", "Repository not found")
            m = MODELS[mid]
            if m["gated"] and not authed:
                return self._error(401, "GatedRepo", "Access to this model is restricted")
            if m["gated"] and authed and mid != "acme/gated-3b-granted":
                return self._error(403, "GatedRepo", "You are not in the authorized list")
            if filename != "config.json" or m["config"] is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            body = json.dumps(m["config"]).encode()
            etag = f'"{abs(hash(body)) % 10**12:012d}"'
            return self._send(200, body, {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/json"})
        self._send(404, b"not found")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The fake Hub on a free port, HF_ENDPOINT at it, an empty HF cache, no token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.requests = []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import: a test before this one that imported it
    # (transformers does) under a monkeypatched HF_HUB_OFFLINE=1 leaves its client offline for good
    from huggingface_hub import constants as hf_constants  # noqa: PLC0415

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()
    server.server_close()


def test_search_sorts_and_reads_parameter_counts(fake_hub):
    by_dl = hub.search_models("acme", sort="downloads", limit=10)
    assert [s.id for s in by_dl][:2] == ["acme/popular-1b", "acme/qwen-clone-0.5b"]
    assert by_dl[0].hub_params == 1_100_000_000 and by_dl[0].downloads == 90000
    by_likes = hub.search_models("acme", sort="likes", limit=2)
    assert [s.id for s in by_likes] == ["acme/liked-2b", "acme/gated-3b"]
    recent = hub.search_models("acme", sort="recent", limit=1)
    assert recent[0].id == "acme/gated-3b" and recent[0].gated is True
    # the client asked for text-generation models, sorted the way we meant
    queries = [parse_qs(urlsplit(p).query) for m, p, h in FakeHub.requests if p.startswith("/api/models?")]
    assert queries[0]["pipeline_tag"] == ["text-generation"]
    assert [q["sort"][0] for q in queries] == ["downloads", "likes", "lastModified"]
    # shapes are guessed from the count until config.json is read
    assert not by_dl[0].exact and abs(by_dl[0].params_total - 1.1e9) / 1.1e9 < 0.5


def test_resolve_model_reads_config_json_exactly(fake_hub):
    spec = catalog.resolve_model("acme/qwen-clone-0.5b")
    assert spec.source == "hub" and spec.exact
    assert spec.params_total == 494_032_768  # same shape as Qwen2.5-0.5B: its known parameter count
    assert spec.downloads == 500 and spec.likes == 7
    # config.json landed in the HF cache: the cache scan and an offline resolve now find it
    cached = {s.id: s for s in catalog.scan_cache()}
    assert "acme/qwen-clone-0.5b" in cached and cached["acme/qwen-clone-0.5b"].source == "cache"
    again = catalog.resolve_model("acme/qwen-clone-0.5b", offline=True)
    assert again.source == "cache" and again.params_total == spec.params_total


def test_missing_config_falls_back_to_parameter_count(fake_hub):
    spec = catalog.resolve_model("acme/liked-2b")
    assert not spec.exact and spec.hub_params == 2_000_000_000
    assert "no config.json" in spec.note and "wider margin" in spec.note


def test_unknown_architecture_is_flagged(fake_hub):
    spec = catalog.resolve_model("acme/weird-arch")
    assert not spec.exact and "mamba2" in spec.note


def test_missing_repo_is_unknown_model_with_suggestions(fake_hub):
    with pytest.raises(UserError) as err:
        catalog.resolve_model("Qwen/Qwen2.5-0.5C")
    assert "unknown model" in err.value.message and "Qwen/Qwen2.5-0.5B" in str(err.value)


def test_gated_without_token_names_hf_token(fake_hub):
    with pytest.raises(hub.HubAccessDenied) as err:
        catalog.resolve_model("acme/gated-3b")
    text = str(err.value)
    assert "gated" in text and "HF_TOKEN" in text and "huggingface-cli login" in text


def test_gated_with_token_sends_it_and_never_prints_it(fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    rc = main(["estimate", "--model", "acme/gated-3b", "--gpu", "t4"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "no access" in captured.err and "accept the license" in captured.err
    assert SECRET not in captured.out + captured.err
    sent = [h.get("authorization") for m, p, h in FakeHub.requests if "/resolve/" in p]
    assert f"Bearer {SECRET}" in sent  # the client did use the token (from the environment)


def test_unreachable_hub_is_fast_and_the_catalog_still_works(monkeypatch, capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(hub.HubUnreachable):
        hub.search_models("qwen")
    with pytest.raises(hub.HubUnreachable):
        catalog.resolve_model("acme/not-cached")
    assert catalog.resolve_model("Qwen/Qwen2.5-0.5B").source == "catalog"
    assert main(["models", "--search", "qwen2.5"]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-1.5B" in out and "Hub unreachable" in out
    assert main(["models", "--source", "hub"]) == 2


def test_offline_switch_skips_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnreachable, match="HF_HUB_OFFLINE"):
        hub.check_reachable()


def test_cli_models_lists_hub_results_with_fit(fake_hub, capsys):
    assert main(["models", "--source", "hub", "--search", "acme", "--fits", "gtx-1650", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ids = [m["id"] for m in data["models"]]
    assert ids[0] == "acme/popular-1b" and data["hub"] == "ok"
    assert all(m["fit"] in ("fits", "tight", "no") for m in data["models"])
    # a 3B model with a guessed shape and a 25% margin cannot be called a fit on 3.82 GiB
    assert {m["id"]: m["fit"] for m in data["models"]}["acme/gated-3b"] == "no"


def test_cli_estimate_hub_model(fake_hub, capsys):
    assert main(["estimate", "--model", "acme/qwen-clone-0.5b", "--gpu", "gtx-1650", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["source"] == "hub" and data["verdict"] in ("fits", "tight", "does not fit")
    assert "cuda_context" in data["components"]
