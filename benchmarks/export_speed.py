"""Export speed and size: merged, GGUF f16 and GGUF q4_k_m, for the demo model and a ~28M-parameter model.

For each model a LoRA adapter (r=16, all linear layers, random non-zero B so the merge really changes weights)
is exported three ways, each in a fresh process so that its peak memory (max RSS) is its own. The baseline,
measured in the same run, is the cheapest thing an export must do anyway: load the base model with
transformers and save it again. Printed: wall time, peak RSS, output size, time against the baseline, and the
GGUF file size against the merged model's safetensors size.

Run: .venv/bin/python benchmarks/export_speed.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIG = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4}

# Runs in a child process: one measurement, printed as JSON on the last line.
CHILD = """
import json, resource, sys, time
from pathlib import Path
task, source, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
start = time.perf_counter()
if task == "baseline":
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(out)
else:
    from training.export import export
    fmt, _, quantization = task.partition(":")
    export(source, fmt, quantization=quantization or "q4_k_m", output=out)
seconds = time.perf_counter() - start
size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf"))
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "bytes": size}))
"""


def make_adapter(base: Path, target: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base).save_pretrained(target)


def build_big(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.demo_model import demo_model_path

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path(Path(tempfile.mkdtemp())))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **BIG)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def measure(task: str, source: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, task, str(source), str(out)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{task} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from training.demo_model import demo_model_path

    work = Path(tempfile.mkdtemp(prefix="backprop-export-bench-"))
    demo = demo_model_path(work / "home")
    big = work / "llama-28m"
    build_big(big)
    for name, base in (("demo", demo), ("~28M", big)):
        params = _count_params(base)
        adapter = work / f"{name}-adapter"
        make_adapter(base, adapter)
        baseline = measure("baseline", base, work / f"{name}-baseline")
        print(f"\n{name} model: {params / 1e6:.1f}M parameters")
        print(f"  {'baseline load+save':22} {baseline['seconds']:6.2f} s  peak {baseline['peak_mb']:6.0f} MB  "
              f"{baseline['bytes'] / 2**20:7.1f} MiB")  # fmt: skip
        merged_bytes = None
        for task in ("merged", "gguf:f16", "gguf:q4_k_m"):
            r = measure(task, adapter, work / f"{name}-{task.replace(':', '-')}")
            merged_bytes = r["bytes"] if task == "merged" else merged_bytes
            ratio = f"   size vs merged safetensors {r['bytes'] / merged_bytes:.2f}x" if task != "merged" else ""
            print(f"  {task:22} {r['seconds']:6.2f} s  peak {r['peak_mb']:6.0f} MB  {r['bytes'] / 2**20:7.1f} MiB"
                  f"   time vs baseline {r['seconds'] / baseline['seconds']:5.1f}x{ratio}")  # fmt: skip


def _count_params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


if __name__ == "__main__":
    main()
