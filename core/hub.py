"""The Hugging Face Hub, through huggingface_hub: search, model info, config.json.

huggingface_hub is imported inside each function (it takes ~0.3 s to import and the wizard
must start fast). The endpoint (HF_ENDPOINT), cache (HF_HOME / HF_HUB_CACHE) and offline
switch (HF_HUB_OFFLINE) are read from the environment at call time, not at import, so a
test or a user can change them in-process. The token comes from HF_TOKEN or the stored
`huggingface-cli login`, through huggingface_hub itself; snugtune never stores or prints it
(every message leaving this module goes through `_scrub`).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from core.errors import UserError

if TYPE_CHECKING:
    from core.catalog import ModelSpec

DEFAULT_ENDPOINT = "https://huggingface.co"
# How long to wait for the Hub's TCP port before calling it unreachable. huggingface_hub itself
# retries a failed connection five times with backoff (~25 s offline); a quick probe first keeps
# `snugtune models` and the wizard snappy on a machine without internet.
PROBE_TIMEOUT_S = 2.5
_probe_cache: dict[str, tuple[float, bool]] = {}
PROBE_TTL_S = 30.0

SORTS = {"downloads": "downloads", "likes": "likes", "recent": "last_modified", "trending": "trending_score"}


class HubUnreachable(UserError):
    """The Hub could not be reached (offline, DNS, firewall, HF_HUB_OFFLINE). The catalog still works."""


class HubNotFound(UserError):
    """No such repository on the Hub (or private without a token)."""


class HubAccessDenied(UserError):
    """A gated or private repository the current token cannot read."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _token_present() -> bool:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:
        return False


def _scrub(text: str) -> str:
    """Remove any token value from a message (defence in depth: the client should never echo it)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        tok = os.environ.get(var)
        if tok and len(tok) >= 4:
            text = text.replace(tok, "***")
    return text


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_reachable(timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise HubUnreachable unless the Hub's host accepts a TCP connection (cached briefly)."""
    if offline_mode():
        raise HubUnreachable("the Hugging Face Hub is off (HF_HUB_OFFLINE is set); showing the catalog and local cache")
    url = endpoint()
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy a direct TCP probe says nothing; let the client try through it
    now = time.monotonic()
    hit = _probe_cache.get(url)
    if hit and now - hit[0] < PROBE_TTL_S:
        ok = hit[1]
    else:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                ok = True
        except OSError:
            ok = False
        _probe_cache[url] = (now, ok)
    if not ok:
        raise HubUnreachable(
            f"the Hugging Face Hub ({url}) is unreachable from this machine; the built-in catalog and the "
            "local cache still work",
            hint="check the network, or set HF_ENDPOINT to a mirror",
        )


def _api():
    from huggingface_hub import HfApi  # noqa: PLC0415 (slow import, only when the Hub is used)

    return HfApi(endpoint=endpoint())


def _translate(exc: Exception, repo_id: str | None, what: str) -> UserError:
    """Map huggingface_hub/httpx errors to one clear UserError (never with a token inside)."""
    from huggingface_hub import errors as E  # noqa: PLC0415

    login = "set HF_TOKEN or run `huggingface-cli login` (then accept the license on the model's page)"
    if isinstance(exc, E.GatedRepoError):
        if _token_present():
            return HubAccessDenied(
                f"{repo_id} is a gated model and your Hugging Face token has no access to it yet",
                hint=f"accept the license at {endpoint()}/{repo_id} with the account your token belongs to",
            )
        return HubAccessDenied(f"{repo_id} is a gated model; reading its {what} needs a Hugging Face token", hint=login)
    if isinstance(exc, E.RepositoryNotFoundError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401 and not _token_present():
            return HubNotFound(
                f"{repo_id} was not found on the Hub (or it is private/gated and no token is set)", hint=login
            )
        return HubNotFound(f"{repo_id} was not found on the Hub", hint="check the spelling: owner/name")
    if isinstance(exc, (E.RevisionNotFoundError,)):
        return HubNotFound(f"{repo_id}: that revision does not exist on the Hub")
    if isinstance(exc, (E.EntryNotFoundError,)):
        return HubNotFound(f"{repo_id} has no {what} on the Hub")
    if isinstance(exc, E.OfflineModeIsEnabled):
        return HubUnreachable("the Hugging Face Hub is off (HF_HUB_OFFLINE is set)")
    if isinstance(exc, E.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return HubUnreachable(_scrub(f"the Hub answered HTTP {status} while reading {what} of {repo_id or 'models'}"))
    # httpx2.ConnectError / TimeoutException / OSError: the network, not the model.
    return HubUnreachable(_scrub(f"the Hugging Face Hub ({endpoint()}) is unreachable: {type(exc).__name__}: {exc}"))


def search_models(text: str = "", sort: str = "downloads", limit: int = 20) -> list["ModelSpec"]:
    """Text-generation models matching `text`, sorted by downloads, likes or recency.

    Each result's shape is guessed from the Hub's safetensors parameter count (exact=False);
    `fetch_spec(id)` reads its config.json for the exact numbers.
    """
    from core.catalog import spec_from_param_count

    if sort not in SORTS:
        raise UserError(f"unknown sort {sort!r}; choose one of: {', '.join(SORTS)}")
    check_reachable()
    try:
        infos = list(
            _api().list_models(
                search=text or None,
                pipeline_tag="text-generation",
                sort=SORTS[sort],
                limit=limit,
                expand=["downloads", "likes", "lastModified", "gated", "safetensors"],
            )
        )
    except Exception as exc:  # noqa: BLE001 (translated into a UserError)
        raise _translate(exc, None, "the model list") from None
    out = []
    for info in infos:
        n = getattr(getattr(info, "safetensors", None), "total", None)
        spec = spec_from_param_count(info.id, int(n) if n else 1_000_000_000, source="hub",
                                     note="" if n else "parameter count unknown (no safetensors metadata)")
        out.append(_with_meta(spec, info, n))
    return out


def _with_meta(spec, info, n):
    lm = getattr(info, "last_modified", None)
    gated = getattr(info, "gated", None)
    return replace(
        spec,
        downloads=getattr(info, "downloads", None),
        likes=getattr(info, "likes", None),
        last_modified=lm.isoformat() if hasattr(lm, "isoformat") else (str(lm) if lm else None),
        gated=bool(gated) if gated is not None else None,
        hub_params=int(n) if n else spec.hub_params,
        size_gib=round(int(n) * 2 / 2**30, 2) if n else spec.size_gib,
    )


def model_info(repo_id: str, revision: str | None = None):
    check_reachable()
    try:
        return _api().model_info(repo_id, revision=revision, expand=["downloads", "likes", "lastModified", "gated", "safetensors"])
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc, repo_id, "model information") from None


def fetch_config(repo_id: str, revision: str | None = None) -> dict:
    """config.json of a Hub model (downloaded into the HF cache, a few KB)."""
    import json

    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    from core.catalog import hf_cache_dir

    check_reachable()
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, endpoint=endpoint(), cache_dir=str(hf_cache_dir()))
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc, repo_id, "config.json") from None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fetch_spec(repo_id: str, revision: str | None = None) -> "ModelSpec":
    """The exact spec of a Hub model from its config.json, with downloads/likes/params metadata.

    No config.json, or one the estimator cannot read: falls back to the safetensors parameter
    count (exact=False, wider margin) and says so in the spec's note.
    """
    from core.catalog import spec_from_config, spec_from_param_count

    info = model_info(repo_id, revision)
    n = getattr(getattr(info, "safetensors", None), "total", None)
    try:
        cfg = fetch_config(repo_id, revision)
        spec = spec_from_config(cfg, repo_id, source="hub")
    except HubAccessDenied:
        raise
    except (HubNotFound, UserError) as exc:
        if isinstance(exc, HubUnreachable):
            raise
        if not n:
            raise UserError(
                f"{repo_id}: no usable config.json and no parameter count on the Hub; cannot estimate it",
                hint="pass a local model directory instead",
            ) from None
        reason = "has no config.json" if isinstance(exc, HubNotFound) else f"config.json is not usable ({exc.message})"
        spec = spec_from_param_count(
            repo_id, int(n), source="hub",
            note=f"{repo_id} {reason}; shape guessed from its {int(n) / 1e9:.2f}B parameters (wider margin)",
        )
    return _with_meta(spec, info, n)
