"""Datasets: every format normalizes to chat messages; every kind of bad input is a coded error with file:line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_lines

from training.datasets import load_dataset, scan, split
from training.errors import BackpropError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    return write_lines(tmp_path / name, [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows])


@pytest.mark.parametrize(
    ("row", "expected_format", "expected"),
    [
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}, "sharegpt", CHAT),
        ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}, "sharegpt", CHAT),
        ({"messages": CHAT}, "openai", CHAT),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
                    {"role": "assistant", "content": "Hello!"},
                ]
            },
            "openai",
            CHAT,
        ),  # fmt: skip
        ({"instruction": "Hi", "input": "", "output": "Hello!"}, "alpaca", CHAT),
        (
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            "alpaca",
            [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}],
        ),  # fmt: skip
        ({"prompt": "Hi", "completion": "Hello!"}, "prompt_completion", CHAT),
        ({"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"}, "chatml", CHAT),
        ({"text": "Just some prose."}, "text", [{"role": "text", "content": "Just some prose."}]),
    ],
)
def test_each_format_normalizes_to_chat_messages(tmp_path, row, expected_format, expected):
    dataset = load_dataset(jsonl(tmp_path, [row]))
    assert dataset.report.format == expected_format
    assert dataset.examples[0].messages == expected


def test_system_turns_are_kept_and_the_majority_format_is_named(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Yo"},
            ]
        },
        {"messages": CHAT},
        {"messages": CHAT},
    ]
    dataset = load_dataset(jsonl(tmp_path, rows))
    assert dataset.report.format == "openai"
    assert dict(dataset.report.formats) == {"openai": 2, "sharegpt": 1}
    assert dataset.examples[0].messages[0] == {"role": "system", "content": "Be brief."}


def test_forced_format_rejects_rows_of_another_format(tmp_path):
    path = jsonl(tmp_path, [{"messages": CHAT}, {"prompt": "a", "completion": "b"}])
    report = scan(path, fmt="openai")
    assert report.valid_rows == 1
    assert report.errors[0].line == 2 and "'messages' must be a list" in report.errors[0].reason


def test_json_array_csv_parquet_and_text_files(tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps([{"messages": CHAT}, {"prompt": "a", "completion": "b"}], indent=2))
    assert len(load_dataset(array).examples) == 2

    lines_json = jsonl(tmp_path, [{"messages": CHAT}], name="lines.json")
    assert load_dataset(lines_json).report.format == "openai"

    table = tmp_path / "data.csv"
    table.write_text('instruction,input,output\nHi,,Hello!\n"multi\nline",x,y\n')
    dataset = load_dataset(table)
    assert [e.line for e in dataset.examples] == [2, 3]
    assert dataset.examples[0].messages == CHAT

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Hi", "a"], "completion": ["Hello!", "b"]}), tmp_path / "data.parquet")
    assert load_dataset(tmp_path / "data.parquet").examples[0].messages == CHAT

    text = tmp_path / "notes.md"
    text.write_text("# Title\nfirst paragraph\n\nsecond\nparagraph\n")
    dataset = load_dataset(text)
    assert [(e.line, e.messages[0]["content"]) for e in dataset.examples] == [
        (1, "# Title\nfirst paragraph"),
        (4, "second\nparagraph"),
    ]


@pytest.mark.parametrize(
    ("lines", "code", "bad_line", "words"),
    [
        (
            [json.dumps({"messages": CHAT}), '{"messages": [{"role": "user", "content": "trunc'],
            "INPUT_DATASET_INVALID_JSON",
            2,
            "invalid JSON",
        ),
        (
            [json.dumps({"messages": CHAT}), json.dumps({"messages": [{"role": "user", "content": 5}]})],
            "INPUT_DATASET_INVALID_ROW",
            2,
            "must be a string, got int",
        ),  # fmt: skip
        (
            [json.dumps({"messages": [{"role": "user", "content": "only a question"}]})],
            "INPUT_DATASET_NO_ASSISTANT_TURN",
            1,
            "no assistant turn",
        ),
        ([json.dumps({"messages": CHAT}), b'{"text": "caf\xe9"}'], "INPUT_DATASET_ENCODING", 2, "invalid UTF-8"),
        ([json.dumps({"messages": CHAT}), json.dumps({"foo": 1})], "INPUT_DATASET_UNKNOWN_FORMAT", 2, "(keys: foo)"),
        ([json.dumps({"messages": CHAT}), "[1, 2]"], "INPUT_DATASET_INVALID_ROW", 2, "expected a JSON object, got array"),
        ([json.dumps({"conversations": "nope"})], "INPUT_DATASET_INVALID_ROW", 1, "'conversations' must be a list"),
        (
            [json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})],
            "INPUT_DATASET_INVALID_ROW",
            1,
            "unknown role 'wizard'",
        ),  # fmt: skip
    ],
)
def test_bad_rows_give_coded_errors_with_file_and_line(tmp_path, lines, code, bad_line, words):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(BackpropError) as caught:
        load_dataset(path)
    assert caught.value.code == code
    assert f"{path}:{bad_line}:" in caught.value.message
    assert words in caught.value.message
    assert caught.value.hint


@pytest.mark.parametrize(
    ("content", "name", "code"),
    [
        (b"", "empty.jsonl", "INPUT_DATASET_EMPTY"),
        (b"\n  \n", "blank.jsonl", "INPUT_DATASET_EMPTY"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image.jsonl", "INPUT_DATASET_BINARY"),
        (b"not parquet", "fake.parquet", "INPUT_DATASET_BINARY"),
        (b"a,b\n", "data.xlsx", "INPUT_DATASET_UNSUPPORTED_FILE"),
    ],
)
def test_bad_files_give_coded_errors(tmp_path, content, name, code):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BackpropError) as caught:
        load_dataset(path)
    assert caught.value.code == code
    assert str(path) in caught.value.message


def test_missing_file_and_truncated_json_array(tmp_path):
    with pytest.raises(BackpropError) as caught:
        load_dataset(tmp_path / "nope.jsonl")
    assert caught.value.code == "INPUT_DATASET_NOT_FOUND"

    array = tmp_path / "cut.json"
    array.write_text('[\n  {"messages": []},\n  {"prompt": "a", "comp')
    report = scan(array)
    assert report.errors[-1].code == "INPUT_DATASET_INVALID_JSON"
    assert report.errors[-1].line == 3


def test_skip_invalid_trains_on_good_rows_and_reports_every_skipped_line(tmp_path):
    path = jsonl(tmp_path, [{"messages": CHAT}, "{broken", {"messages": CHAT}, {"prompt": 1, "completion": "x"}])
    dataset = load_dataset(path, skip_invalid=True)
    assert [e.line for e in dataset.examples] == [1, 3]
    assert [(e.line, e.code) for e in dataset.report.errors] == [
        (2, "INPUT_DATASET_INVALID_JSON"),
        (4, "INPUT_DATASET_INVALID_ROW"),
    ]
    with pytest.raises(BackpropError, match=r"and 1 more bad rows"):
        load_dataset(path)


def test_split_is_seeded_and_disjoint(tmp_path):
    dataset = load_dataset(jsonl(tmp_path, [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]))
    train, val = split(dataset.examples, 0.2, seed=7)
    again, val_again = split(dataset.examples, 0.2, seed=7)
    assert len(val) == 4 and len(train) == 16
    assert [e.line for e in val] == [e.line for e in val_again]
    assert {e.line for e in train}.isdisjoint({e.line for e in val})
    assert [e.line for e in split(dataset.examples, 0.2, seed=8)[1]] != [e.line for e in val]


def test_token_length_stats_use_the_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = scan(
        jsonl(tmp_path, [{"messages": CHAT}, {"prompt": "a longer question here", "completion": "b"}]), tokenizer=tokenizer
    )
    stats = report.tokens.to_dict()
    assert stats["count"] == 2 and 5 < stats["min"] < stats["max"] < 40


def test_validating_a_large_file_keeps_memory_flat(tmp_path):
    """Peak memory while scanning ~150 MB of JSONL stays close to scanning 1 MB: rows are streamed."""
    row = json.dumps({"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y" * 400}]})
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text((row + "\n") * 1_000)
    with large.open("w") as f:
        for _ in range(180):
            f.write((row + "\n") * 1_000)
    probe = (
        "import resource, sys; from training.datasets import scan; r = scan(sys.argv[1]);"
        "print(r.valid_rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )

    def peak_kb(path: Path) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    rows_small, peak_small = peak_kb(small)
    rows_large, peak_large = peak_kb(large)
    assert (rows_small, rows_large) == (1_000, 180_000)
    assert large.stat().st_size > 140e6
    assert peak_large - peak_small < 30_000, f"peak grew by {(peak_large - peak_small) / 1024:.0f} MB"


def test_a_hub_dataset_id_offline_is_a_clear_coded_error():
    with pytest.raises(BackpropError) as caught:
        load_dataset("someone/some-dataset")
    assert caught.value.code == "DEP_DATASET_DOWNLOAD_FAILED" and caught.value.exit_code == 2
    assert "someone/some-dataset" in caught.value.message


# ---------------------------------------------------------------- byte-order marks and CRLF line ends

BOM = b"\xef\xbb\xbf"
QA = [("What is the capital of France?", "Paris."), ("And of Italy?", "Rome.")]


def _file_bodies() -> dict[str, str]:
    """The same two examples as each text file type, with LF line ends."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    return {
        "data.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
        "array.json": json.dumps(rows, indent=2) + "\n",
        "lines.json": "".join(json.dumps(r) + "\n" for r in rows),
        "table.csv": "prompt,completion\n" + "".join(f'"{q}",{a}\n' for q, a in QA),
        "notes.txt": "first paragraph\nstill the first\n\nsecond paragraph\n",
        "notes.md": "# Title\nintro line\n\n- a list item\n- another\n",
    }


@pytest.mark.parametrize("name", list(_file_bodies()))
def test_a_byte_order_mark_and_crlf_line_ends_read_the_same_as_plain_utf8(tmp_path, name):
    """Windows tools and Excel save UTF-8 with a byte-order mark and CRLF; the rows, their lines and their text
    must be exactly those of the plain file (no BOM in the first value, no carriage returns in the text)."""
    body = _file_bodies()[name]
    plain, windows = tmp_path / "plain", tmp_path / "windows"
    plain.mkdir(), windows.mkdir()
    (plain / name).write_text(body, encoding="utf-8")
    (windows / name).write_bytes(BOM + body.replace("\n", "\r\n").encode())

    expected = load_dataset(plain / name)
    got = load_dataset(windows / name)
    assert got.report.error_count == 0 and got.report.valid_rows == expected.report.valid_rows >= 2
    assert [(e.line, e.messages) for e in got.examples] == [(e.line, e.messages) for e in expected.examples]
    text = json.dumps([e.messages for e in got.examples])
    assert "\\ufeff" not in text and "\\r" not in text


def test_a_file_holding_only_a_byte_order_mark_is_empty_and_utf16_is_named(tmp_path):
    only_bom = tmp_path / "bom.jsonl"
    only_bom.write_bytes(BOM + b"\r\n")
    with pytest.raises(BackpropError) as caught:
        load_dataset(only_bom)
    assert caught.value.code == "INPUT_DATASET_EMPTY"

    utf16 = tmp_path / "unicode.txt"  # Notepad's and Excel's "Unicode" is UTF-16 with its own byte-order mark
    utf16.write_bytes("first paragraph\r\n".encode("utf-16"))
    with pytest.raises(BackpropError) as caught:
        load_dataset(utf16)
    assert caught.value.code == "INPUT_DATASET_ENCODING" and "UTF-16" in caught.value.message
    assert f"{utf16}:1:" in caught.value.message


@pytest.mark.parametrize("name", list(_file_bodies()))
def test_backprop_validate_accepts_a_byte_order_mark_and_crlf(home, tmp_path, name):
    """The real command, with the demo model's tokenizer counting tokens (as the Dataset page does)."""
    from conftest import backprop

    path = tmp_path / name
    path.write_bytes(BOM + _file_bodies()[name].replace("\n", "\r\n").encode())
    result = backprop("validate", str(path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["invalid_rows"] == 0 and report["valid_rows"] == report["rows"] >= 2
    assert report["tokens"]["count"] == report["valid_rows"]


def test_the_dataset_pages_analysis_accepts_a_byte_order_mark(home, tmp_path):
    pytest.importorskip("reflex")
    from app.state.dataset import analyze

    path = tmp_path / "excel.csv"
    path.write_bytes(BOM + _file_bodies()["table.csv"].replace("\n", "\r\n").encode())
    result = analyze(path, "demo")
    assert (result["rows"], result["valid"], result["invalid"], result["errors"]) == (2, 2, 0, [])
    assert result["preview"][0][0] == {"role": "user", "content": QA[0][0]}


@pytest.mark.slow
def test_training_runs_on_the_demo_dataset_saved_with_a_byte_order_mark_and_crlf(home, tmp_path):
    from conftest import DEMO_DATA

    from training import Trainer

    path = tmp_path / "capitals-windows.jsonl"
    path.write_bytes(BOM + DEMO_DATA.read_bytes().replace(b"\n", b"\r\n"))
    result = Trainer("demo").train(path, steps=8)
    assert result.status == "completed" and result.steps == 8

    from training.events import read_events

    events, _ = read_events(Path(result.run_dir) / "events.jsonl")
    started = next(e for e in events if e["event"] == "started")
    assert started["examples"] + started["validation_examples"] == len(DEMO_DATA.read_text().splitlines())
