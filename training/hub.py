"""Push an export (the LoRA adapter, or the merged model) to the Hugging Face Hub.

    push("3f2a", "me/my-model", private=True)      # token from HF_TOKEN or a token file; never printed

Failures have their own codes: a bad or missing token, a repository that does not exist or is not yours, and a
hub that cannot be reached (offline machines fail fast with a clear message instead of retrying for minutes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.errors import BackpropError

CONNECT_TIMEOUT_S = 10


def read_token(token_file: str | Path | None = None) -> str:
    if token_file is not None:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise BackpropError("DEP_HUB_AUTH_FAILED", reason=f"cannot read the token file: {exc.strerror}") from exc
    else:
        token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise BackpropError("DEP_HUB_AUTH_FAILED", reason="no token (set HF_TOKEN or pass --token-file)")
    return token


def push(
    source: str | Path,
    repo: str,
    *,
    private: bool = False,
    merged: bool = False,
    token_file: str | Path | None = None,
    home: Path | None = None,
) -> dict[str, Any]:
    """Upload a run's adapter (or merged model, exported first when needed) or a folder, with its model card."""
    from training.export import export

    token = read_token(token_file)  # before any slow work: a missing token is the most common mistake
    folder = Path(source).expanduser()
    if not folder.is_dir():
        folder = Path(export(source, "merged" if merged else "lora", home=home).path)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(CONNECT_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(CONNECT_TIMEOUT_S))
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                   commit_message="Upload from Backprop")  # fmt: skip
    except Exception as exc:
        raise _coded(exc, repo) from exc
    return {"repo": repo, "url": str(url), "commit": getattr(commit, "oid", None), "folder": str(folder), "private": private}


def _coded(exc: Exception, repo: str) -> BackpropError:
    """Map whatever the hub client raised to one of three coded errors (the token never appears in them)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return BackpropError("INPUT_HUB_REPO_NOT_FOUND", repo=repo)
    if status in (401, 403):
        return BackpropError("DEP_HUB_AUTH_FAILED", reason=f"the hub answered {status} for {repo}")
    first_line = (str(exc).splitlines() or [""])[0][:200]
    if isinstance(exc, HfHubHTTPError) and status is not None:
        return BackpropError("DEP_HUB_UNREACHABLE", reason=f"HTTP {status}: {first_line}")
    return BackpropError("DEP_HUB_UNREACHABLE", reason=f"{type(exc).__name__}: {first_line}")
