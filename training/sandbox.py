"""The web app's sandbox: every file it writes (uploads, runs, exports) stays under one output folder.

root = sandbox_root(settings.ui.output_dir)     # refused if it is a system or secrets folder
path = inside(root, "datasets", user_supplied)  # refused if it would leave the sandbox
name = safe_name("../../My data (v2).jsonl")    # 'My_data_v2.jsonl'
"""

from __future__ import annotations

import re
from pathlib import Path

from training.errors import BackpropError

# Folders a sandbox may never be (or be inside of): system trees and where credentials live.
DENYLIST = ("/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot", "/dev", "/proc", "/sys", "/var", "/root/.ssh")
HOME_SECRETS = (".ssh", ".aws", ".gnupg", ".kube", ".docker", ".config/gcloud", ".azure")


def sandbox_root(folder: Path) -> Path:
    """The resolved sandbox folder, created; a denied location is UI_OUTPUT_DIR_FORBIDDEN."""
    root = Path(folder).expanduser().resolve()
    home = Path.home().resolve()
    denied = [Path(d) for d in DENYLIST] + [home / s for s in HOME_SECRETS]
    for bad in denied:
        if root == bad or (bad != Path("/") and bad in root.parents):
            raise BackpropError("UI_OUTPUT_DIR_FORBIDDEN", path=root, reason=f"it is {'inside ' if root != bad else ''}{bad}")
    if root == home:
        raise BackpropError("UI_OUTPUT_DIR_FORBIDDEN", path=root, reason="it is your whole home folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


def inside(root: Path, *parts: str) -> Path:
    """`root/parts...` resolved; UI_PATH_OUTSIDE_SANDBOX if it escapes the sandbox (.., absolute paths, symlinks)."""
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise BackpropError("UI_PATH_OUTSIDE_SANDBOX", path="/".join(parts), root=root)
    return path


def safe_name(name: str, default: str = "file") -> str:
    """A file name with no folders, no leading dots and only letters, digits, '.', '-' and '_'."""
    base = Path(name.replace("\\", "/")).name
    stem, dot, suffix = base.rpartition(".")
    if not dot or not stem.strip("."):  # no extension, or a dot file like ".hidden"
        stem, suffix = base, ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("._-")[:100]
    suffix = re.sub(r"[^A-Za-z0-9]+", "", suffix)[:10].lower()
    return (stem or default) + (f".{suffix}" if suffix else "")
