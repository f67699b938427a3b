"""The error catalogue: every failure a user can meet has a stable code, a hint and an exit code.

Raise with `BackpropError("INPUT_DATASET_NOT_FOUND", path=...)`; the message and hint templates below
are filled from the keyword arguments. Exit codes: 1 input or config, 2 runtime or dependency,
3 partial success, 130 interrupted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorSpec:
    message: str
    hint: str
    retryable: bool = False
    exit_code: int | None = None  # None: derived from the code's prefix


CATALOGUE: dict[str, ErrorSpec] = {
    # Input: the user's files and arguments.
    "INPUT_DATASET_NOT_FOUND": ErrorSpec(
        "Dataset not found: {path}",
        "Check the path, or give a hub dataset id like 'owner/name' when online.",
    ),
    "INPUT_DATASET_EMPTY": ErrorSpec(
        "{path}: the dataset holds no rows",
        "Add at least one example; see the README for the accepted formats.",
    ),
    "INPUT_DATASET_BINARY": ErrorSpec(
        "{path}:{line}: this looks like a binary file, not text",
        "Datasets are .jsonl, .json, .csv, .parquet, .txt or .md files.",
    ),
    "INPUT_DATASET_ENCODING": ErrorSpec(
        "{path}:{line}: invalid UTF-8 ({reason})",
        "Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`.",
    ),
    "INPUT_DATASET_INVALID_JSON": ErrorSpec(
        "{path}:{line}: invalid JSON ({reason})",
        "Each line of a .jsonl file must be one complete JSON object. "
        "Fix the line, or pass --skip-invalid to train on the good rows.",
    ),
    "INPUT_DATASET_INVALID_ROW": ErrorSpec(
        "{path}:{line}: {reason}",
        "Fix the row, or pass --skip-invalid to train on the good rows; `backprop validate FILE` lists every bad line.",
    ),
    "INPUT_DATASET_NO_ASSISTANT_TURN": ErrorSpec(
        "{path}:{line}: the conversation has no assistant turn to learn from",
        "Every chat example needs at least one assistant (gpt) message.",
    ),
    "INPUT_DATASET_UNKNOWN_FORMAT": ErrorSpec(
        "{path}:{line}: no known dataset format fits this row ({reason})",
        "Accepted: ShareGPT 'conversations', OpenAI 'messages', Alpaca instruction/output, "
        "prompt/completion, or 'text'. Force one with --format.",
    ),
    "INPUT_DATASET_UNSUPPORTED_FILE": ErrorSpec(
        "{path}: unsupported file type '{suffix}'",
        "Use .jsonl, .json, .csv, .parquet, .txt or .md.",
    ),
    "INPUT_DATASET_TOO_SMALL": ErrorSpec(
        "{path}: {reason}",
        "Add more rows or lower --validation-split.",
    ),
    "INPUT_DATASET_TOOLS_UNSUPPORTED": ErrorSpec(
        "{path}:{line}: {reason}",
        "Train a model whose chat template renders tools (e.g. Qwen2.5-Instruct), remove the tool turns, or pass "
        "--skip-invalid to train on the other rows; `backprop validate FILE --model MODEL` lists every such line.",
    ),
    "INPUT_DATASET_TEMPLATE_ERROR": ErrorSpec(
        "{path}:{line}: {reason}",
        "Fit the row to the model's chat format (many templates want user and assistant turns to alternate), pick "
        "another model, or pass --skip-invalid to train on the other rows.",
    ),
    "INPUT_DATASET_BAD_PAIR": ErrorSpec(
        "{path}:{line}: {reason}",
        "A preference row needs a prompt, a chosen and a rejected answer, both non-empty and different from each other "
        '(README "Preferences"); fix the row or pass --skip-invalid to train on the others.',
    ),
    "INPUT_DATASET_NOT_PREFERENCE": ErrorSpec(
        "{path}: --method {method} trains on preference pairs, and {reason}",
        "Give rows with prompt, chosen and rejected (or conversations, chosen and rejected), or train with --method sft.",
    ),
    "INPUT_DATASET_HUB_SELECTION": ErrorSpec(
        "Hub dataset {dataset}: {reason}",
        "Name a config with owner/name:config and a split with owner/name@split (the dataset card lists them), "
        "e.g. owner/name:default@train or owner/name@train[:1000].",
    ),
    "INPUT_WORLD_SIZE_CHANGED": ErrorSpec(
        "Run {run_id} was trained on {recorded} processes; it cannot continue on {current}: its batch positions are "
        "global batches of {recorded} shares",
        "Resume with --nproc {recorded} (and the same --nnodes), or start a new run.",
    ),
    "INPUT_STRATEGY_UNSUPPORTED": ErrorSpec(
        "Strategy '{strategy}' is not available here: {reason}",
        "Use --strategy ddp (the default), which works on CPU and GPUs alike.",
    ),
    "INPUT_DATASET_CHANGED": ErrorSpec(
        "{path} changed since run {run_id} started (sha256 {recorded:.12} then, {current:.12} now): resuming would train "
        "on other rows under the same batch positions",
        "Start a new run on the changed data, or resume with --allow-changed-data to continue on it anyway.",
    ),
    "INPUT_RUN_NOT_FOUND": ErrorSpec(
        "No run matches '{run_id}'",
        "`backprop list` shows the runs and their ids.",
    ),
    "INPUT_RUN_AMBIGUOUS": ErrorSpec(
        "'{run_id}' matches several runs: {matches}",
        "Type more characters of the id.",
    ),
    "INPUT_MODEL_NOT_FOUND": ErrorSpec(
        "Model not found: {model}",
        "Give a preset name (`backprop info` lists them), a hub id like 'Qwen/Qwen2.5-0.5B-Instruct', "
        "a local folder with config.json, a .gguf file, an Ollama model as ollama:NAME[:TAG], or 'demo'.",
    ),
    "INPUT_MODEL_NO_CHAT_TEMPLATE": ErrorSpec(
        "{model}'s tokenizer has no chat template: a multi-run cannot carry the chat tokens it would add across its merges",
        "Use a model with a chat template (every preset has one, as do Instruct models), or train this one with "
        "`backprop train`, which adds and trains the chat tokens.",
    ),
    "INPUT_INVALID_ARGUMENT": ErrorSpec("{reason}", "{hint}"),
    "INPUT_RUN_WONT_FIT": ErrorSpec(
        "The run will not fit: {reason}",
        "Lower --batch-size or --max-seq-length, or use --qlora; `backprop plan` shows the estimate, --no-plan starts anyway.",
    ),
    # The web app.
    "UI_OUTPUT_DIR_FORBIDDEN": ErrorSpec(
        "The web app's output folder {path} is not allowed: {reason}",
        "Set BACKPROPAGATE_UI__OUTPUT_DIR to a folder of its own, e.g. ~/.backpropagate/ui-outputs.",
    ),
    "UI_PATH_OUTSIDE_SANDBOX": ErrorSpec(
        "'{path}' is outside the web app's folder {root}",
        "Pick a file inside the app's folder, or upload it on the Dataset page.",
    ),
    "UI_UPLOAD_REJECTED": ErrorSpec(
        "Upload '{name}' refused: {reason}",
        "Datasets are .jsonl, .json, .csv, .parquet, .txt or .md files up to the size limit (ui.max_upload_mb).",
    ),
    "UI_EVENT_REFUSED": ErrorSpec(
        "The page cannot set '{name}': {reason}",
        "Only a page's own form fields can be set from the browser; reload the page.",
    ),
    "UI_AUTH_REQUIRED": ErrorSpec(
        "Sign in first: this Backprop web app requires a password",
        "Open the app's address in a browser and sign in; a session lasts ui.session_hours hours.",
    ),
    "UI_AUTH_PASSWORD_MISSING": ErrorSpec(
        "Authentication is on but no password is set",
        "Set BACKPROPAGATE_UI__PASSWORD (or ui.password in backprop.config.json), or run `backprop ui --auth` in a "
        "terminal to be asked for one.",
    ),
    "UI_SHARE_REQUIRES_AUTH": ErrorSpec(
        "`backprop ui --share` publishes the app to the internet and is refused without authentication",
        "Add --auth (and a password), or set BACKPROPAGATE_SECURITY__REQUIRE_AUTH_FOR_SHARE=false to share it open.",
    ),
    "UI_HOST_NOT_ALLOWED": ErrorSpec(
        "This Backprop web app does not answer to the host '{host}'",
        "Open it at the address `backprop ui` printed (http://127.0.0.1:<port>/ or http://localhost:<port>/); to reach "
        "it under a name of your own, add that name to ui.allowed_hosts "
        "(BACKPROPAGATE_UI__ALLOWED_HOSTS=name or name:port, comma-separated).",
    ),
    "UI_ORIGIN_NOT_ALLOWED": ErrorSpec(
        "Refused a request made by a page of '{origin}': only the app's own pages may use the app",
        "Use the app from its own address; if you serve it under a name of your own, add that name to ui.allowed_hosts "
        "(BACKPROPAGATE_UI__ALLOWED_HOSTS).",
    ),
    "UI_DEV_AUTH_UNSUPPORTED": ErrorSpec(
        "`backprop ui --dev --auth` is refused: in dev mode the pages come from a second server, outside the sign-in gate",
        "Use `backprop ui --auth` (the production build) for a password; keep --dev for developing the app on your own machine.",
    ),
    "DEP_TUNNEL_UNAVAILABLE": ErrorSpec(
        "No tunnel could publish the app: {reason}",
        "Install cloudflared (or ngrok, signed in), or give --share ssh:user@host for an SSH reverse tunnel.",
        retryable=True,
    ),
    "INPUT_ADAPTER_MISMATCH": ErrorSpec(
        "The LoRA adapters do not match: {reason}",
        "Every run of a multi-run must use the same base model, LoRA rank and target modules.",
    ),
    "INPUT_OUTPUT_NOT_WRITABLE": ErrorSpec(
        "Cannot write to {path}: {reason}",
        "Choose another --output folder, or check its permissions and free space.",
    ),
    "INPUT_HUB_REPO_NOT_FOUND": ErrorSpec(
        "Hub repository {repo} was not found, or this token cannot see it",
        "Check the name (owner/name) and that the token's account owns it or belongs to its organisation.",
    ),
    "INPUT_MODEL_INVALID": ErrorSpec(
        "{path}: {reason}",
        "GGUF export needs a model folder saved with save_pretrained: config.json, *.safetensors and tokenizer.json.",
    ),
    "INPUT_UNSUPPORTED_ARCHITECTURE": ErrorSpec(
        "GGUF export does not support {architecture}",
        "Supported: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (Llama 3.x, SmolLM2, Mistral, Qwen2.5). "
        "Export the adapter or the merged model instead.",
    ),
    "INPUT_UNKNOWN_QUANTIZATION": ErrorSpec(
        "Unknown quantization '{quantization}'",
        "Choose one of: {choices}.",
    ),
    "INPUT_COMPARE_RUN_COUNT": ErrorSpec(
        "Compare takes 2 to 6 different runs; {count} given",
        "Pass 2 to 6 run ids (or unambiguous prefixes); `backprop list` shows them.",
    ),
    "INPUT_SCRIPT_NOT_FOUND": ErrorSpec(
        "Training script not found: {path}",
        "Give the path of a script that accepts --run-id and --max-minutes; see assets/examples/train_script.py.",
    ),
    # Config.
    "CONFIG_INVALID": ErrorSpec(
        "Invalid setting: {reason}",
        "Check backprop.config.json, BACKPROPAGATE_* environment variables and the flags you passed.",
    ),
    "CONFIG_FILE_UNREADABLE": ErrorSpec(
        "Cannot read config file {path}: {reason}",
        "backprop.config.json must be a JSON object.",
    ),
    # Dependencies.
    "DEP_MODEL_LOAD_FAILED": ErrorSpec(
        "Could not load model '{model}': {reason}",
        "Hub models need internet on first use (then they come from the HF cache). "
        "Offline, use a local folder or the built-in 'demo' model.",
        retryable=True,
    ),
    "DEP_DATASET_DOWNLOAD_FAILED": ErrorSpec(
        "Could not download dataset '{dataset}': {reason}",
        "Check your connection, or download the file and pass its path.",
        retryable=True,
    ),
    "DEP_HUB_AUTH_FAILED": ErrorSpec(
        "Hugging Face Hub authentication failed: {reason}",
        "Create a write token at https://huggingface.co/settings/tokens and set HF_TOKEN or pass --token-file FILE.",
    ),
    "DEP_HUB_UNREACHABLE": ErrorSpec(
        "The Hugging Face Hub cannot be reached: {reason}",
        "Check the internet connection (and HF_ENDPOINT, if set); the export is kept locally, push again later.",
        retryable=True,
    ),
    "DEP_OLLAMA_REGISTRATION_FAILED": ErrorSpec(
        "Could not register '{name}' with Ollama at {host}: {reason}",
        "Start the Ollama server (`ollama serve` or the Ollama app) or set OLLAMA_HOST to a running one, then try again.",
        retryable=True,
    ),
    "DEP_TRACKER_FAILED": ErrorSpec(
        "{tracker} tracking failed: {reason}; training goes on without it",
        "Check the tracker's settings (MLFLOW_TRACKING_URI, WANDB_API_KEY or WANDB_MODE=offline), "
        "or leave it out with --report-to.",
        retryable=True,
    ),
    "DEP_MISSING": ErrorSpec(
        "{package} is not installed: {reason}",
        "Install it with: pip install {install}",
    ),
    # Runtime.
    "RUNTIME_OOM_RECOVERY_EXHAUSTED": ErrorSpec(
        "Out of GPU memory even at batch size {batch_size}",
        "Lower --max-seq-length, use --qlora, or pick a smaller model.",
    ),
    "RUNTIME_OOM_SHARDED": ErrorSpec(
        "Out of GPU memory at step {step} on rank {rank} under {strategy}: its step cannot be retried on one rank",
        "Resume with a smaller --batch-size (or --gradient-checkpointing, or more GPUs); the last checkpoint is kept.",
    ),
    "RUNTIME_TRAINING_FAILED": ErrorSpec(
        "Training failed: {reason}",
        "Run again with --verbose for the traceback.",
    ),
    "RUNTIME_NAN_LOSS": ErrorSpec(
        "The loss became {value} at step {step}",
        "Lower the learning rate (--lr) or raise warmup.",
    ),
    "RUNTIME_GPU_TEMPERATURE_CRITICAL": ErrorSpec(
        "{reason}",
        "The job was paused while the GPU cooled and stopped with a checkpoint when it did not. Improve cooling or "
        "raise gpu.maxPauseMinutes, then `backprop resume` the run.",
    ),
    "RUNTIME_EXPORT_FAILED": ErrorSpec(
        "Export to {path} failed: {reason}",
        "Earlier exports are untouched. Check the free disk space and try again.",
    ),
    "RUNTIME_MERGE_MISMATCH": ErrorSpec(
        "The merged model's logits differ from the adapter model's by {difference} of their scale (tolerance "
        "{tolerance}); the greedy token differs at {flips} of {positions} positions",
        "The merged weights are not saved. Export the LoRA adapter instead, and report this with the run's spec.json.",
    ),
    "RUNTIME_GGUF_QUANTIZATION_FAILED": ErrorSpec(
        "llama.cpp could not quantize the model to {quantization}: {reason}",
        "Export f16 or q8_0 instead, or check the free disk space.",
    ),
    "RUNTIME_GGUF_VERIFICATION_FAILED": ErrorSpec(
        "The GGUF file {path} failed verification: {reason}",
        "Do not ship this file; the export's verification report shows the tokenizer and greedy-decoding differences.",
    ),
    "RUNTIME_SCRIPT_FAILED": ErrorSpec(
        "The training script failed: {reason}",
        "See the run's script.log (`backprop status RUN_ID` prints its path).",
    ),
    "RUNTIME_UNEXPECTED": ErrorSpec(
        "Unexpected error in {where}: {reason}",
        "This is a bug in Backprop: the traceback is in the log of `backprop ui` (its terminal). "
        "Please report it, with the traceback.",
    ),
    "RUNTIME_INTERRUPTED": ErrorSpec(
        "Interrupted by the user",
        "`backprop resume {run_id}` continues from the last checkpoint.",
        exit_code=130,
    ),
    # State.
    "STATE_NOT_RESUMABLE": ErrorSpec(
        "Run {run_id} cannot be resumed: {reason}",
        "Only runs that are interrupted, time-boxed, stopped or failed after a checkpoint can resume.",
    ),
    "STATE_RUN_ACTIVE": ErrorSpec(
        "Run {run_id} is still {status} (pid {pid})",
        "Wait for it to finish, or stop it first.",
    ),
    "STATE_RUN_NOT_ACTIVE": ErrorSpec(
        "Run {run_id} is not running (it is {status})",
        "`backprop resume {run_id}` continues a stopped, time-boxed or interrupted run.",
    ),
    "STATE_NO_ADAPTER": ErrorSpec(
        "Run {run_id} has no final adapter yet (it is {status})",
        "Export a completed run; `backprop resume {run_id}` finishes a stopped or time-boxed one.",
    ),
    "STATE_ADAPTER_MISMATCH": ErrorSpec(
        "The adapter {path} does not fit this run's model: {reason}",
        "A run can start only from LoRA weights of the same base model, LoRA rank and target modules; "
        "start a new multi-run (or run) instead of resuming this one.",
    ),
    "STATE_CHECKPOINT_CORRUPT": ErrorSpec(
        "Checkpoint {path} is unreadable: {reason}",
        "Delete that checkpoint folder; resume then uses the one before it.",
    ),
    "STATE_REGISTRY_TOO_NEW": ErrorSpec(
        "The run registry {path} has schema version {version}; this Backprop understands up to {supported}",
        "A newer Backprop wrote it: upgrade Backprop, or set BACKPROPAGATE_HOME to another folder for this version.",
    ),
    "STATE_REGISTRY_CORRUPT": ErrorSpec(
        "The run registry {path} is unreadable: {reason}",
        "Move it aside; run folders under the home directory are kept.",
    ),
}

_EXIT_BY_PREFIX = {"INPUT": 1, "CONFIG": 1, "UI": 1, "DEP": 2, "RUNTIME": 2, "STATE": 2}


class BackpropError(Exception):
    """An error a user can act on: `[CODE] message` plus a hint."""

    def __init__(self, code: str, message: str | None = None, hint: str | None = None, **fields: object):
        spec = CATALOGUE.get(code)
        if spec is None:
            raise KeyError(f"unknown error code {code}: add it to training/errors.py")
        self.code = code
        self.fields = fields
        self.message = message or _fill(spec.message, fields)
        self.hint = hint or _fill(spec.hint, fields)
        self.retryable = spec.retryable
        self.exit_code = spec.exit_code or _EXIT_BY_PREFIX[code.split("_", 1)[0]]
        super().__init__(f"[{code}] {self.message}")

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "hint": self.hint, "retryable": self.retryable}


def _fill(template: str, fields: dict[str, object]) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError):
        return template


_SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{10,}"),
    re.compile(r"(?i)((?:token|password|secret|api[_-]?key)\s*[=:]\s*)\S+"),
    re.compile(r"(?i)(bearer\s+)\S+"),
]


def redact(text: str) -> str:
    """Mask tokens and passwords before anything reaches a terminal or a log."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


def catalogue_markdown() -> str:
    """docs/errors.md: every code with its exit code, message and hint (`python -m training.errors > docs/errors.md`)."""
    lines = [
        "# Error codes",
        "",
        "Generated from the catalogue in `training/errors.py` by `python -m training.errors > docs/errors.md`; a test",
        "keeps it equal. `{name}` marks a part filled in from the failure. Exit codes: 1 input or config, 2 runtime or",
        "dependency, 3 partial, 130 interrupted.",
        "",
        "| code | exit | message | hint |",
        "|---|---|---|---|",
    ]
    for code in sorted(CATALOGUE):
        spec = CATALOGUE[code]
        cells = (spec.message, spec.hint)
        exit_code = spec.exit_code or _EXIT_BY_PREFIX[code.split("_", 1)[0]]
        lines.append(f"| `{code}` | {exit_code} | " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(catalogue_markdown(), end="")
