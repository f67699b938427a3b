"""Settings, resolved in this order (later wins):

    defaults  <  backprop.config.json  <  BACKPROPAGATE_* env vars  <  CLI flags or UI form

Nested env vars use "__": `BACKPROPAGATE_LORA__R=16`. The config file is `backprop.config.json` in the
current directory, or the path in `BACKPROPAGATE_CONFIG`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from training.errors import BackpropError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TRACKERS = ("tensorboard", "mlflow", "wandb")  # what training.report_to may name (training/tracking.py)


class LoraSettings(BaseModel):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class TrainingSettings(BaseModel):
    steps: int | None = Field(None, ge=1, description="optimizer steps; wins over epochs")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_seq_length: int = Field(1024, ge=16)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: str = Field("cosine", pattern="^(cosine|linear|constant)$")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    method: str = Field(
        "sft", pattern="^(sft|dpo|orpo)$",
        description="sft: supervised (next-token loss on the answers); dpo and orpo: preference pairs (prompt, chosen, "
        "rejected), see README \"Preferences\"",
    )  # fmt: skip
    beta: float = Field(0.1, gt=0, description="DPO: how far the policy may move from the reference (higher: less)")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight of the odds-ratio term beside the chosen answers' loss")
    packing: bool = True
    response_only: bool = True
    validation_split: float = Field(0.0, ge=0, lt=1)
    eval_every: int = Field(0, ge=0, description="steps between evals; 0: only at the end")
    early_stopping_patience: int = Field(0, ge=0, description="stop after this many evals without improvement; 0: off")
    save_every: int = Field(50, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    qlora: bool = False
    use_unsloth: bool = True
    bf16: bool | None = None  # None: bf16 on CUDA when supported, fp32 on CPU
    loss_kernel: str = Field(
        "auto", pattern="^(auto|liger|chunked|plain)$",
        description="auto: liger-kernel's fused linear cross-entropy on CUDA when installed, else chunked (never all logits "
        "at once); plain: all logits (used anyway when the output head is trained)",
    )  # fmt: skip
    attention: str = Field(
        "auto", pattern="^(auto|sdpa|eager|flash_attention_2)$",
        description="auto: flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else sdpa",
    )  # fmt: skip
    gradient_checkpointing: bool | None = Field(
        None, description="None: on when a micro-batch's estimated activations would not fit in free VRAM (CUDA only)"
    )
    report_to: str = Field(
        "auto", description="experiment trackers: auto (TensorBoard when installed, MLflow when MLFLOW_TRACKING_URI is set, "
        "W&B when a key is configured or WANDB_MODE=offline), none, or a comma list of wandb, tensorboard, mlflow",
    )  # fmt: skip

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> str:
        """A list (the library's report_to=[...]) or a comma list; "auto" and "none" stand alone."""
        names = [str(v).strip().lower() for v in (value if isinstance(value, list | tuple) else str(value).split(","))]
        names = [n for n in names if n]
        if not names or names in (["auto"], ["none"]):
            return names[0] if names else "none"
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {', '.join(unknown)}: use auto, none or a comma list of {', '.join(TRACKERS)}")
        return ",".join(dict.fromkeys(names))


class UiSettings(BaseModel):
    output_dir: Path = Path("~/.backpropagate/ui-outputs").expanduser()
    port: int = 7862
    host: str = "127.0.0.1"
    max_upload_mb: int = 500
    auth: bool = Field(False, description="require a password (then a session cookie) on every page, event and upload")
    password: SecretStr | None = Field(None, description="the password when auth is on (or give password_hash)")
    password_hash: str | None = Field(None, description="scrypt hash of the password, as `backprop ui --auth` passes it")
    session_hours: float = Field(12, gt=0, description="how long a login lasts")
    max_failed_logins: int = Field(5, ge=1, description="failed logins per client address and minute before 429")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="more names the app answers to, 'name' (any port) or 'name:port', besides loopback, ui.host and "
        "the tunnel's host; requests for other hosts or from other sites' pages get 403",
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
        """The env var takes a JSON list or plain comma-separated names."""
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [h.strip() for h in value.split(",") if h.strip()]
        return value


class SecuritySettings(BaseModel):
    require_auth_for_share: bool = Field(True, description="`backprop ui --share` is refused without --auth")


class GpuSettings(BaseModel):
    probe: str = Field("auto", pattern="^(auto|nvml|nvidia-smi|none)$", description="how GPUs are read")
    min_free_vram_mb: int = Field(2500, ge=0, description="admission: free VRAM on the chosen GPU")
    max_temp_c: float = Field(85, gt=0, description="above this a job pauses at its next step")
    cool_down_c: float = Field(5, ge=0, description="resume once this much below max_temp_c ...")
    cool_down_seconds: float = Field(30, ge=0, description="... for this long")
    max_pause_minutes: float = Field(30, ge=0, description="a longer pause stops the job with a checkpoint; 0: no limit")


class DistributedSettings(BaseModel):
    """Several processes, GPUs or machines: torchrun launches one process per device, accelerate drives them."""

    nproc: int | str = Field(1, description="processes (GPUs) on this machine; 'auto': every GPU the governor admits")
    nnodes: int = Field(1, ge=1, description="machines taking part; the same command runs on each")
    node_rank: int = Field(0, ge=0, description="this machine's index among them (0 holds the rendezvous)")
    master_addr: str = Field("127.0.0.1", description="address of machine 0")
    master_port: int = Field(0, ge=0, le=65535, description="rendezvous port on machine 0; 0: a free one (one machine)")
    strategy: str = Field("ddp", pattern="^(ddp|fsdp|deepspeed-zero2|deepspeed-zero3)$", description="how the model is spread")
    collective_timeout_s: float = Field(
        120, gt=0, description="a collective that waits this long (a rank died) ends the run as interrupted"
    )

    @field_validator("nproc")
    @classmethod
    def _nproc(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value != "auto":
            if not value.isdigit():
                raise ValueError("nproc is a number of processes or 'auto'")
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError("nproc must be at least 1")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BACKPROPAGATE_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    home: Path = Path("~/.backprop").expanduser()
    model: str = DEFAULT_MODEL
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    ui: UiSettings = UiSettings()
    security: SecuritySettings = SecuritySettings()
    distributed: DistributedSettings = DistributedSettings()
    # The governor (config file keys in camelCase also work: maxRunMinutes, gpu.maxTempC, ...).
    max_run_minutes: float = Field(10, ge=0, description="time box of every job; 0: none")
    max_parallel: int = Field(1, ge=1, description="jobs running at once")
    min_free_ram_gb: float = Field(4, ge=0, description="admission: free system RAM")
    max_cpu_percent: float = Field(95, gt=0, description="admission: system CPU load")
    gpu_memory_limit: str | None = Field(None, pattern=r"^\d+(\.\d+)?\s*(%|gb|GB|g|G)?$", description="'80%' or GB")
    gpu: GpuSettings = GpuSettings()
    telemetry_interval_s: float = Field(1.0, ge=0, description="seconds between telemetry samples; 0: no watcher")
    telemetry_file: Path | None = Field(None, description="simulated sensor readings (testing and demos)")
    stop_grace_seconds: float = Field(30, ge=0, description="graceful stop, then forced after this long")
    script_startup_s: float = Field(
        120, ge=0, description="a script that sends no step message this long (or a time box, if longer) is time-boxed"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: flags, then env, then the JSON file, then the defaults above.
        return (init_settings, env_settings, JsonFileSource(settings_cls))


class JsonFileSource(PydanticBaseSettingsSource):
    """Reads backprop.config.json; a broken file is a coded error, never silently ignored."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = config_file_path()
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackpropError("CONFIG_FILE_UNREADABLE", path=path, reason=exc) from exc
        if not isinstance(data, dict):
            raise BackpropError("CONFIG_FILE_UNREADABLE", path=path, reason="top level is not an object")
        return snake_keys(data)


def snake_keys(value: Any) -> Any:
    """{"maxRunMinutes": 5, "gpu": {"maxTempC": 80}} -> {"max_run_minutes": 5, "gpu": {"max_temp_c": 80}}."""
    if not isinstance(value, dict):
        return value
    return {re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", k).lower(): snake_keys(v) for k, v in value.items()}


def config_file_path() -> Path:
    return Path(os.environ.get("BACKPROPAGATE_CONFIG", "backprop.config.json")).expanduser()


def load_settings(**overrides: Any) -> Settings:
    """Settings with `overrides` (CLI flags, form fields) on top; None values mean "not given"."""
    cleaned = _drop_none(overrides)
    try:
        return Settings(**cleaned)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BackpropError("CONFIG_INVALID", reason=f"{where}: {first['msg']}") from exc
    except SettingsError as exc:  # an environment variable that should hold JSON does not
        raise BackpropError("CONFIG_INVALID", reason=str(exc)) from exc


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


# Flat option names (CLI flags, library keyword arguments, form fields) and where they live.
FLAT_OPTIONS: dict[str, str] = {
    "model": "model",
    "home": "home",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "lr": "training.learning_rate",
    **{
        name: name
        for name in (
            "max_run_minutes",
            "max_parallel",
            "min_free_ram_gb",
            "max_cpu_percent",
            "gpu_memory_limit",
            "telemetry_interval_s",
            "telemetry_file",
            "stop_grace_seconds",
        )
    },
    **{name: f"distributed.{name}" for name in DistributedSettings.model_fields},
    "gpu_probe": "gpu.probe",
    "gpu_min_vram": "gpu.min_free_vram_mb",
    "gpu_max_temp": "gpu.max_temp_c",
    **{name: f"training.{name}" for name in TrainingSettings.model_fields},
}


def nest_options(flat: dict[str, Any]) -> dict[str, Any]:
    """{"lr": 1e-3, "lora_r": 8} -> {"training": {"learning_rate": 1e-3}, "lora": {"r": 8}}; None means not given."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        if key not in FLAT_OPTIONS:
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"unknown option '{key}'",
                                hint=f"Known options: {', '.join(sorted(FLAT_OPTIONS))}")  # fmt: skip
        *parents, leaf = FLAT_OPTIONS[key].split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def fill_unset(settings: Settings, flat: dict[str, Any], *, mark_set: bool = True) -> Settings:
    """`settings` with the flat options (FLAT_OPTIONS names) the user did not set; what was set stays. `mark_set`: the
    filled values count as set from now on (a plan's choices); else they stay defaults (a model's own)."""
    nested = nest_options(flat)
    changed: dict[str, Any] = {}
    for section, values in nested.items():
        current = getattr(settings, section)
        if not isinstance(values, dict):
            if section not in settings.model_fields_set:
                changed[section] = values
            continue
        unset = {k: v for k, v in values.items() if k not in current.model_fields_set}
        if unset:
            merged = current.model_copy(update=unset)
            merged.__pydantic_fields_set__ = set(current.model_fields_set) | (set(unset) if mark_set else set())
            changed[section] = merged
    return settings.model_copy(update=changed) if changed else settings
