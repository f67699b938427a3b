"""Fetching a hub model (or a hub dataset's data files) into the Hugging Face cache before it is loaded: progress,
resuming where a download stopped.

    download_model("Qwen/Qwen2.5-1.5B-Instruct", on_progress=lambda done, total: ...)  # bytes
    download_dataset_files("owner/name", ["data/train-00000-of-00002.parquet", ...], commit, on_progress)

Only what loading a causal LM reads is fetched: configs, tokenizer files, chat templates and the safetensors weights
(PyTorch `.bin` weights only for a repo without safetensors; never GGUF, ONNX or a repo's other folders). The cache is
huggingface_hub's (HF_HOME, by default ~/.cache/huggingface): a model fetched once loads offline afterwards.

Why not just `snapshot_download`: huggingface_hub 2.x writes every download to a temporary file unique to its
process, so a download that is killed (or a machine that sleeps) starts again from byte 0, and an Xet download cannot
be continued either. Here each missing file is fetched over HTTP into `blobs/<etag>.incomplete` in the cache, which a
later download continues with a Range request; when complete it becomes the blob, and `snapshot_download` then only
links the snapshot (no bytes move twice). Offline (HF_HUB_OFFLINE=1) nothing is asked of the network: the cached
folder is used. A hub that cannot be reached is DEP_MODEL_LOAD_FAILED at once unless the model is cached.

`weights=False` fetches the config and tokenizer alone: what a plan or a token count needs.

A dataset's files land in the same cache, where the `datasets` library (which fetches them with `hf_hub_download`)
then finds them: training/datasets.py names the files of the selected split, this module fetches them.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from training.errors import BackpropError

Progress = Callable[[int, int], None]  # (done_bytes, total_bytes)

# Top-level files that loading a causal LM with its tokenizer reads (config, generation config, tokenizer, templates).
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "additional_chat_templates/*.jinja")
BIN_WEIGHTS = "pytorch_model*.bin"  # only for a repo without safetensors
PARALLEL_FILES = 4  # shards fetched at once: one HTTP stream each
MB = 1024 * 1024
UNREACHABLE_RECHECK_S = 60.0
# (hub id, revision, weights) -> (its folder, until when): found complete in the cache (for good), or the hub unreachable
_CHECKED: dict[tuple[str, str, bool], tuple[Path, float]] = {}


def model_files(files: list[str], weights: bool = True) -> list[str]:
    """The files of a repo to fetch for training (see MODEL_FILES); PyTorch weights when it has no safetensors.
    Without `weights`: the config and tokenizer files alone (what a plan or a token count reads)."""
    wanted = [f for f in files if any(fnmatch(f, p) and f.count("/") == p.count("/") for p in MODEL_FILES)]
    if not any(f.endswith(".safetensors") for f in wanted):
        wanted += [f for f in files if "/" not in f and fnmatch(f, BIN_WEIGHTS)]
    return sorted(f for f in wanted if weights or not f.endswith((".safetensors", ".bin")))


def download_model(hub_id: str, on_progress: Progress | None = None, revision: str = "main", *, weights: bool = True) -> Path:
    """The folder of `hub_id` in the HF cache, with the files that were not cached yet fetched first (without
    `weights`: config and tokenizer only). Offline (HF_HUB_OFFLINE), or with the hub unreachable, the cached folder;
    once a process has found a model complete it does not ask the hub again. `on_progress(done, total)` is called as bytes
    arrive; `done` starts at the bytes kept from an interrupted download. DEP_MODEL_LOAD_FAILED when it cannot be had."""
    from huggingface_hub import HfApi, constants

    for key in ((hub_id, revision, weights), (hub_id, revision, True)):
        folder, until = _CHECKED.get(key, (None, 0.0))
        if folder is not None and time.monotonic() < until and (folder / "config.json").exists():
            return folder
    if constants.HF_HUB_OFFLINE:
        return _cached(hub_id, revision, "offline (HF_HUB_OFFLINE is set)")
    try:
        info = HfApi().model_info(hub_id, revision=revision, files_metadata=True)
        files = model_files([s.rfilename for s in info.siblings or []], weights)
        plan = _missing(hub_id, "model", files, info.sha)
    except Exception as exc:
        if not _is_network_error(exc):
            raise _load_failed(hub_id, exc) from exc
        folder = _cached(hub_id, revision, f"the hub ({constants.ENDPOINT}) cannot be reached")
        # The loader reads the cache; the next loads of this process do not wait on the hub again for a while.
        _CHECKED[(hub_id, revision, weights)] = (folder, time.monotonic() + UNREACHABLE_RECHECK_S)
        return folder
    counter = _Counter(sum(b.size or 0 for b in plan), sum(b.kept() for b in plan), on_progress)
    try:
        folder = _fetch(hub_id, "model", files, revision, plan, counter)
    except Exception as exc:
        raise _load_failed(hub_id, exc, counter) from exc
    _CHECKED[(hub_id, revision, weights)] = (folder, math.inf)
    return folder


def download_dataset_files(repo: str, files: list[str], revision: str, on_progress: Progress | None = None) -> Path:
    """Fetch `files` of the dataset repo `repo` at `revision` (best a commit: what the `datasets` library asks for)
    into the HF cache, those not cached yet, resuming partial ones; the snapshot folder. `on_progress` as for
    `download_model`. DEP_DATASET_DOWNLOAD_FAILED when the hub does not give them."""
    counter = None
    try:
        plan = _missing(repo, "dataset", files, revision)
        counter = _Counter(sum(b.size or 0 for b in plan), sum(b.kept() for b in plan), on_progress)
        return _fetch(repo, "dataset", files, revision, plan, counter)
    except Exception as exc:
        raise BackpropError("DEP_DATASET_DOWNLOAD_FAILED", dataset=repo, reason=_reason(exc, counter)) from exc


def _missing(repo: str, repo_type: str, files: list[str], commit: str) -> list[_Blob]:
    """The files not in the cache yet, each with its size and where its bytes come from (one HEAD request each)."""
    from huggingface_hub import try_to_load_from_cache

    missing = [f for f in files if not isinstance(try_to_load_from_cache(repo, f, revision=commit, repo_type=repo_type), str)]
    return [_Blob.ask(repo, repo_type, f, commit) for f in missing]


def _fetch(repo: str, repo_type: str, files: list[str], revision: str, plan: list[_Blob], counter: _Counter) -> Path:
    """Fetch the planned blobs, PARALLEL_FILES at once, then link `files` into the snapshot folder of `revision`."""
    from huggingface_hub import snapshot_download

    with _quiet(), ThreadPoolExecutor(PARALLEL_FILES) as pool:
        list(pool.map(lambda blob: blob.fetch(counter), plan))
        # The blobs are all there: this links the snapshot and records the revision for offline use (refs/main for main).
        folder = snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=[glob.escape(f) for f in files])
    counter.finish()
    return Path(folder)


def _cached(hub_id: str, revision: str, why: str) -> Path:
    """The model's snapshot folder in the cache, when it is there; why the hub was not asked, when it is not."""
    from huggingface_hub import constants, try_to_load_from_cache

    config = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    if not isinstance(config, str):
        reason = f"{why} and the model is not in the cache ({constants.HF_HUB_CACHE})"
        raise BackpropError("DEP_MODEL_LOAD_FAILED", model=hub_id, reason=reason)
    return Path(config).parent


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from the library while it fetches and links (ours are the events and the CLI's line)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


class _Blob:
    """One file to fetch into its cache blob, continuing a partial one (`<blob>.incomplete`) from where it ends."""

    def __init__(self, repo: str, repo_type: str, filename: str, meta: Any):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        folder = repo_folder_name(repo_id=repo, repo_type=repo_type)
        self.filename, self.url = filename, meta.location
        self.size: int | None = meta.size  # None: the hub did not say (then a partial file cannot be trusted)
        self.path = Path(constants.HF_HUB_CACHE) / folder / "blobs" / meta.etag
        self.partial = self.path.with_name(f"{meta.etag}.incomplete")
        self.lock = Path(constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"  # the library's lock of it
        self.counted = self.kept()

    @classmethod
    def ask(cls, repo: str, repo_type: str, filename: str, commit: str) -> _Blob:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo, filename, repo_type=repo_type, revision=commit)
        return cls(repo, repo_type, filename, get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT))

    def kept(self) -> int:
        """Bytes of an earlier, interrupted download of this file (0 when none, or when they cannot be its bytes)."""
        size = self.partial.stat().st_size if self.partial.exists() else 0
        return size if self.size is not None and size <= self.size else 0

    def fetch(self, counter: _Counter) -> None:
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(self.lock):
            if self.path.exists():  # another process (a rank, another run) fetched it meanwhile
                counter.add((self.size or 0) - self.counted)
                return
            kept = self.kept()
            with self.partial.open("ab") as file:
                file.truncate(kept)
                file.seek(kept)
                counter.add(kept - self.counted)
                # http_get asks for the rest with a Range header and retries a dropped connection from where it broke.
                http_get(self.url, _Counting(file, counter), resume_size=kept, headers=build_hf_headers(),
                         expected_size=self.size)  # fmt: skip
            if self.size is not None and self.partial.stat().st_size != self.size:
                raise OSError(f"{self.filename}: got {self.partial.stat().st_size} of {self.size} bytes")
            os.replace(self.partial, self.path)


class _Counting:
    """The file a download writes to, counting the bytes that land in it (and those a restart throws away)."""

    def __init__(self, file: Any, counter: _Counter):
        self.file, self.counter = file, counter

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        self.counter.add(written)
        return written

    def truncate(self, size: int | None = None) -> int:
        before = os.fstat(self.file.fileno()).st_size
        after = self.file.truncate(self.file.tell() if size is None else size)
        self.counter.add(after - before)
        return after

    def __getattr__(self, name: str) -> Any:  # seek, tell, flush
        return getattr(self.file, name)


class _Counter:
    """Bytes done of `total`, from every thread; reports each change to `on_progress`."""

    def __init__(self, total: int, done: int, on_progress: Progress | None):
        import threading

        self.total, self.done, self.on_progress = total, done, on_progress
        self.lock = threading.Lock()
        if total and on_progress is not None:
            on_progress(done, total)

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.total and n and self.on_progress is not None:
                self.on_progress(min(self.done, self.total), self.total)

    def finish(self) -> None:
        if self.total and self.on_progress is not None and self.done < self.total:
            self.on_progress(self.total, self.total)


class DownloadEvents:
    """An `on_progress` that turns byte counts into `download` events: the first at once, then one a second at most,
    and the last (durable) when the download completes. Rate and ETA count only this session's bytes. `what` is
    "model" or "dataset": the stage ("downloading dataset"), the message, and the field that names the repo."""

    def __init__(self, hub_id: str, emit: Callable[..., Any], every_s: float = 1.0, *, what: str = "model"):
        self.hub_id, self.emit, self.every_s, self.what = hub_id, emit, every_s, what
        self.started: float | None = None
        self.first_done = 0
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started, self.first_done = now, done
        finished = done >= total
        if not finished and self.last and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        eta = round((total - done) / rate) if rate > 0 and not finished else None
        size = f"{done / MB:.1f} / {total / MB:.1f} MB"
        pace = f" ({rate / MB:.1f} MB/s, {eta} s left)" if eta is not None else ""
        stage = f"downloaded {self.what}" if finished else f"downloading {self.what}"
        message = f"{stage} {self.hub_id}: " + (f"{total / MB:.1f} MB in {elapsed:.0f} s" if finished else f"{size}{pace}")
        self.emit("download", durable=finished, stage=stage, **{self.what: self.hub_id}, done_bytes=done, total_bytes=total,
                  done_mb=round(done / MB, 1), total_mb=round(total / MB, 1), rate_mb_s=round(rate / MB, 2), eta_s=eta,
                  message=message)  # fmt: skip


def _lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub.utils import WeakFileLock
    except ImportError:  # older huggingface_hub
        from filelock import FileLock

        return FileLock(str(path))
    return WeakFileLock(str(path))


def _is_network_error(exc: Exception) -> bool:
    """No answer from the hub (refused, timed out, offline mode), as opposed to an answer that is an error."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, HfHubHTTPError):
        return False
    transport = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
    return transport or isinstance(exc, OfflineModeIsEnabled | ConnectionError | TimeoutError)


def _load_failed(hub_id: str, exc: Exception, counter: _Counter | None = None) -> BackpropError:
    return BackpropError("DEP_MODEL_LOAD_FAILED", model=hub_id, reason=_reason(exc, counter, "model"))


def _reason(exc: Exception, counter: _Counter | None, what: str = "dataset") -> str:
    """Why a download failed, and how far it got (a rerun continues from there)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        reason = f"the {what} is gated: accept its terms on its hub page, then set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        reason = f"no such {what} on the hub (a private one needs HF_TOKEN)"
    else:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    if counter is not None and counter.done:
        reason += f" (stopped at {counter.done / MB:.1f} / {counter.total / MB:.1f} MB: run again to continue from there)"
    return reason
