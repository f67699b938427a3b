"""What `backprop info` reports: versions, CUDA and GPUs, which optional extras are installed."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

from training.extras import EXTRAS


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    import torch

    from training import __version__
    from training.config import load_settings
    from training.models import PRESETS

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    return {
        "backprop": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpus,
        "extras": {dist: package_version(dist) or "" for modules in EXTRAS.values() for dist in modules.values()},
        "home": str(load_settings().home),
        "presets": [
            {
                "hub_id": p.hub_id,
                "params_billion": p.params_billion,
                "vram_gb": p.vram_gb(),
                "qlora_vram_gb": p.vram_gb(qlora=True),
            }
            for p in PRESETS.values()
        ],
    }
