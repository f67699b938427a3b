"""The `backprop` command as a user meets it: help, exit codes, coded errors, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DEMO_DATA, backprop, write_lines

from training.config import load_settings, nest_options
from training.control import Control
from training.errors import CATALOGUE, BackpropError, redact
from training.runs import Registry
from training.trainer import new_train_run, run_training


def test_help_is_fast_and_never_imports_torch():
    probe = (
        "import sys\nfrom training.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['list', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    for command in ([], ["train"], ["list"], ["show-run"], ["resume"], ["validate"], ["info"], ["run"], ["status"], ["stop"],
                    ["export"], ["push"], ["chat"], ["generate"], ["multi-run"], ["ui"]):  # fmt: skip
        out = backprop(*command, "--help", check=True)
        assert "usage: backprop" in out.stdout


def test_validate_reports_counts_and_exits_by_usability(home, tmp_path):
    good = backprop("validate", str(DEMO_DATA), "--json")
    report = json.loads(good.stdout)
    assert good.returncode == 0
    assert (report["format"], report["rows"], report["valid_rows"], report["invalid_rows"]) == ("openai", 40, 40, 0)
    assert report["tokens"]["count"] == 40 and report["tokens"]["max"] < 64

    partial = write_lines(tmp_path / "partial.jsonl", [DEMO_DATA.read_text().splitlines()[0], "{oops", '{"prompt": 3}'])
    out = backprop("validate", str(partial))
    assert out.returncode == 3
    assert f"{partial}:2: invalid JSON" in out.stdout and f"{partial}:3:" in out.stdout

    unusable = write_lines(tmp_path / "bad.jsonl", ["{oops"])
    assert backprop("validate", str(unusable), "--no-tokens").returncode == 1

    missing = backprop("validate", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1
    assert "[INPUT_DATASET_NOT_FOUND]" in missing.stderr and "hint:" in missing.stderr


def test_bad_data_fails_training_with_file_and_line_before_loading_anything(home, tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'])
    out = backprop("train", "--model", "demo", "--data", str(bad))
    assert out.returncode == 1
    assert f"[INPUT_DATASET_NO_ASSISTANT_TURN] {bad}:1:" in out.stderr
    runs = json.loads(backprop("list", "--json", check=True).stdout)
    assert runs[0]["status"] == "failed" and runs[0]["error_code"] == "INPUT_DATASET_NO_ASSISTANT_TURN"


def test_an_unreachable_hub_model_fails_with_a_hint_instead_of_hanging(home):
    out = backprop("train", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--data", str(DEMO_DATA), "--steps", "1", timeout=120)
    assert out.returncode == 2
    assert "[DEP_MODEL_LOAD_FAILED]" in out.stderr and "Offline, use a local folder" in out.stderr


def test_unknown_run_and_bad_flags_exit_1(home):
    out = backprop("show-run", "doesnotexist")
    assert out.returncode == 1 and "[INPUT_RUN_NOT_FOUND]" in out.stderr
    assert backprop("resume", "doesnotexist").returncode == 1
    out = backprop("train", "--model", "demo", "--lora-r", "0")
    assert out.returncode == 1 and "[CONFIG_INVALID]" in out.stderr


@pytest.mark.slow
def test_list_and_show_run_describe_a_finished_run(home):
    done = json.loads(backprop("train", "--model", "demo", "--steps", "12", "--save-every", "5", "--name", "tiny", "--json",
                               check=True).stdout.strip().splitlines()[-1])  # fmt: skip
    listed = json.loads(backprop("list", "--json", "--status", "completed", check=True).stdout)
    assert [r["id"] for r in listed] == [done["run_id"]]
    assert backprop("list", "--json", "--status", "failed", check=True).stdout.strip() == "[]"
    table = backprop("list", check=True).stdout
    assert done["run_id"] in table and "tiny" in table and "12/12" in table

    shown = json.loads(backprop("show-run", done["run_id"][:5], "--json", check=True).stdout)
    assert len(shown["losses"]) == 12 and shown["params"]["r"] == 16 and shown["params"]["model"] == "demo"
    assert [c["step"] for c in shown["checkpoints"]] == [10, 12]
    text = backprop("show-run", done["run_id"], check=True).stdout
    assert "loss" in text and "steps 1..12" in text and "checkpoint step 12" in text


def test_info_lists_versions_presets_and_extras(home):
    info = json.loads(backprop("info", "--json", check=True).stdout)
    assert info["torch"].startswith("2.") and info["transformers"] and info["peft"]
    import torch

    if torch.cuda.is_available():  # a GPU machine: CUDA's version and every visible GPU with its memory
        assert info["cuda"] == torch.version.cuda and len(info["gpus"]) == torch.cuda.device_count() > 0
        assert all(g["name"] and g["memory_gb"] > 0 for g in info["gpus"])
    else:
        assert info["cuda"] is None and info["gpus"] == []
    assert {"unsloth", "bitsandbytes"} <= set(info["extras"])
    presets = {p["hub_id"]: p for p in info["presets"]}
    assert len(presets) == 9 and presets["Qwen/Qwen2.5-7B-Instruct"]["vram_gb"] > presets["Qwen/Qwen2.5-0.5B-Instruct"]["vram_gb"]


def test_every_error_code_has_a_hint_and_an_exit_code():
    for code in CATALOGUE:
        error = BackpropError(code)
        assert error.hint and error.exit_code in (1, 2, 3, 130), code


def test_secrets_are_redacted():
    text = redact("token=hf_abcdefghijklmnop password: hunter2 Authorization: Bearer xyz.abc")
    assert "hf_abcdefghijklmnop" not in text and "hunter2" not in text and "xyz.abc" not in text


def test_resume_refuses_changed_data_unless_the_user_allows_it(home, tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text(DEMO_DATA.read_text())
    registry = Registry(home)
    run = new_train_run(registry, load_settings(**nest_options({"model": "demo", "steps": 6, "save_every": 2})), str(data))
    stop = Control()
    run_training(run, registry, control=stop, on_event=lambda e: e["event"] == "step" and e["step"] == 2 and stop.stop.set())
    data.write_text("\n".join(DEMO_DATA.read_text().splitlines()[::-1]) + "\n")

    refused = backprop("resume", run.id)
    assert refused.returncode == 1 and "[INPUT_DATASET_CHANGED]" in refused.stderr and "--allow-changed-data" in refused.stderr
    allowed = backprop("resume", run.id, "--allow-changed-data", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout.strip().splitlines()[-1])["status"] == "completed"
