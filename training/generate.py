"""Generate replies with a trained run: the base model plus its LoRA adapter, chat template applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.errors import BackpropError


class AdapterModel:
    """A base model with a LoRA adapter, ready for greedy or sampled chat replies."""

    def __init__(self, adapter_dir: Path, home: Path | None = None):
        import json

        from peft import PeftModel

        from training.models import load_model, load_tokenizer, resolve_model

        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        if not config_path.exists():
            raise BackpropError("INPUT_MODEL_NOT_FOUND", model=str(adapter_dir))
        base_name = json.loads(config_path.read_text())["base_model_name_or_path"]
        source = resolve_model(base_name, home)
        # The trainer saves the tokenizer beside the adapter; other adapters use the base model's.
        has_tokenizer = (adapter_dir / "tokenizer_config.json").exists()
        self.tokenizer = load_tokenizer(resolve_model(str(adapter_dir)) if has_tokenizer else source)
        self.model = PeftModel.from_pretrained(load_model(source), adapter_dir).eval()

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int = 128, **sampling: Any) -> str:
        import torch

        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=bool(sampling), **sampling)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
