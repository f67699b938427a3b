"""The web app's sandbox and its state logic, without a browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.errors import BackpropError
from training.sandbox import inside, safe_name, sandbox_root


@pytest.mark.parametrize("folder", ["/etc", "/usr/local/share/x", "~/.ssh", "~/.aws/backprop", "/", "~"])
def test_a_sandbox_in_a_system_or_secrets_folder_is_refused(folder):
    with pytest.raises(BackpropError) as error:
        sandbox_root(Path(folder))
    assert error.value.code == "UI_OUTPUT_DIR_FORBIDDEN"


def test_paths_stay_inside_the_sandbox(tmp_path):
    root = sandbox_root(tmp_path / "ui")
    assert inside(root, "datasets", "a.jsonl") == root / "datasets" / "a.jsonl"
    for escape in ("../outside.jsonl", "/etc/passwd", "datasets/../../x"):
        with pytest.raises(BackpropError) as error:
            inside(root, escape)
        assert error.value.code == "UI_PATH_OUTSIDE_SANDBOX"
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(BackpropError):
        inside(root, "link", "x")


def test_uploaded_names_are_made_safe():
    assert safe_name("../../My data (v2).JSONL") == "My_data_v2.jsonl"
    assert safe_name(".hidden") == "hidden"
    assert safe_name("C:\\\\Users\\\\me\\\\chats.json") == "chats.json"
    assert safe_name("...") == "file"


def test_progress_follows_a_run_from_any_offset(tmp_path):
    from app.state.follow import MAX_POINTS, Progress

    events = tmp_path / "events.jsonl"
    lines = [{"t": 1.0, "event": "started", "max_steps": 900, "device": "cpu", "examples": 40}]
    lines += [
        {"t": 2.0, "event": "step", "step": s, "max_steps": 900, "loss": 1 / s, "tokens_per_s": 500.0} for s in range(1, 901)
    ]
    lines += [{"t": 3.0, "event": "eval", "step": 900, "eval_loss": 0.5}, {"t": 4.0, "event": "completed", "adapter": "/a"}]
    text = "".join(json.dumps(e) + "\n" for e in lines)
    events.write_text(text[: len(text) // 2])  # half the run so far, the last line perhaps torn
    progress = Progress(events)
    assert progress.read() and progress.status == "running" and 0 < progress.step < 900
    events.write_text(text)
    progress.read()
    assert (progress.status, progress.step, progress.adapter) == ("completed", 900, "/a")
    assert len(progress.loss) <= MAX_POINTS and progress.loss[-1] == {"step": 900, "eval_loss": 0.5}
    assert progress.loss[-2] == {"step": 900, "loss": 1 / 900}  # the recent curve is exact; older points are thinned
    assert not progress.read()  # nothing new
