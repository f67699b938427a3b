"""Preference data (DPO, ORPO): every accepted shape of a pair normalizes to prompt + chosen + rejected; every bad pair
is INPUT_DATASET_BAD_PAIR with its file:line; preference methods refuse rows that are not pairs; SFT on a pair file
trains on the chosen conversation; `backprop validate` counts the pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, backprop, write_lines

from training.datasets import load_dataset, render_tokens, require_preference, scan
from training.errors import BackpropError

HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello! Nice to meet you."}
GO_AWAY = {"role": "assistant", "content": "Go away."}
SYSTEM = {"role": "system", "content": "Be polite."}
BYE = {"role": "user", "content": "Bye"}
GOOD = {"prompt": "Hi", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."}


def said(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def jsonl(tmp_path: Path, rows: list, name: str = "pairs.jsonl") -> Path:
    return write_lines(tmp_path / name, [r if isinstance(r, str) else json.dumps(r) for r in rows])


def demo_tokenizer(model_dir: Path):
    from training.models import ModelSource, load_tokenizer

    return load_tokenizer(ModelSource(str(model_dir), str(model_dir), True))


@pytest.mark.parametrize(
    ("row", "fmt", "prompt", "chosen", "rejected"),
    [
        pytest.param(GOOD, "preference", [HI], [HELLO], [GO_AWAY], id="plain strings"),
        pytest.param(
            {"prompt": [SYSTEM, HI], "chosen": HELLO, "rejected": [GO_AWAY]},
            "preference", [SYSTEM, HI], [HELLO], [GO_AWAY], id="prompt messages, one answer a message, one a list",
        ),
        pytest.param(
            {"prompt": [HI, HELLO, BYE], "chosen": [said("Bye, take care!")], "rejected": [said("Finally.")]},
            "preference", [HI, HELLO, BYE], [said("Bye, take care!")], [said("Finally.")], id="a multi-turn prompt",
        ),
        pytest.param(
            {"prompt": {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
             "chosen": {"content": "Hello! Nice to meet you."}, "rejected": {"content": "Go away."}},
            "preference", [HI], [HELLO], [GO_AWAY], id="one prompt message with text parts, answers without a role",
        ),
        pytest.param(
            {"system": "Be polite.", "prompt": "Hi", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."},
            "preference", [SYSTEM, HI], [HELLO], [GO_AWAY], id="a row-level system prompt",
        ),
        pytest.param(
            {"chosen": [SYSTEM, HI, HELLO], "rejected": [SYSTEM, HI, GO_AWAY]},
            "preference", [SYSTEM, HI], [HELLO], [GO_AWAY], id="TRL implicit prompt",
        ),
        pytest.param(
            {"chosen": [HI, said("Well,"), said("hello!")], "rejected": [HI, said("Well,"), said("no.")]},
            "preference", [HI], [said("Well,"), said("hello!")], [said("Well,"), said("no.")],
            id="implicit prompt: a shared opening of the answer stays in both answers",
        ),
        pytest.param(
            {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello! Nice to meet you."},
             "rejected": {"from": "gpt", "value": "Go away."}},
            "sharegpt_preference", [HI], [HELLO], [GO_AWAY], id="sharegpt turns",
        ),
        pytest.param(
            {"system": "Be polite.", "conversations": [{"from": "human", "value": "Hi"}], "chosen": "Hello! Nice to meet you.",
             "rejected": "Go away."},
            "sharegpt_preference", [SYSTEM, HI], [HELLO], [GO_AWAY], id="sharegpt with string answers and a system",
        ),
    ],
)  # fmt: skip
def test_each_preference_shape_normalizes_to_prompt_chosen_and_rejected(tmp_path, row, fmt, prompt, chosen, rejected):
    dataset = load_dataset(jsonl(tmp_path, [row]))
    example = dataset.examples[0]
    assert (example.format, example.is_preference) == (fmt, True)
    assert (example.prompt, example.chosen, example.rejected) == (prompt, chosen, rejected)
    assert example.messages == prompt + chosen and example.prompt_turns == len(prompt)
    assert dataset.report.pairs == 1 and dataset.report.to_dict()["pairs"] == 1


def test_a_prompt_may_end_with_a_tool_result(tmp_path):
    call = {**said(""), "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {}}}]}
    result = {"role": "tool", "content": "sunny"}
    row = {"prompt": [HI, call, result], "chosen": "It is sunny, enjoy your day!", "rejected": "Sunny. Whatever."}
    example = load_dataset(jsonl(tmp_path, [row])).examples[0]
    assert example.prompt == [HI, call, result] and example.chosen == [said("It is sunny, enjoy your day!")]


def test_a_pair_written_back_with_to_record_loads_as_the_same_pair(tmp_path):
    first = load_dataset(jsonl(tmp_path, [{**GOOD, "prompt": [SYSTEM, HI]}])).examples[0]
    again = load_dataset(jsonl(tmp_path, [first.to_record()], name="again.jsonl")).examples[0]
    assert (
        (again.prompt, again.chosen, again.rejected)
        == (first.prompt, first.chosen, first.rejected)
        == ([SYSTEM, HI], [HELLO], [GO_AWAY])
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        pytest.param({"prompt": "Hi", "chosen": "Hello!"}, "'rejected' is missing", id="missing rejected"),
        pytest.param({"prompt": "Hi", "rejected": "Go away."}, "'chosen' is missing", id="missing chosen"),
        pytest.param({"prompt": "Hi", "chosen": "Hello!", "rejected": None}, "'rejected' is missing", id="null rejected"),
        pytest.param({"prompt": "  ", "chosen": "Hello!", "rejected": "Go away."}, "the prompt is empty", id="empty prompt"),
        pytest.param({"prompt": [], "chosen": "Hello!", "rejected": "Go away."}, "the prompt is empty", id="no prompt turns"),
        pytest.param({"chosen": "Hello!", "rejected": "Go away."}, "'prompt' is missing", id="string answers, no prompt"),
        pytest.param({"prompt": "Hi", "chosen": "", "rejected": "Go away."}, "the chosen answer is empty", id="empty chosen"),
        pytest.param({**GOOD, "rejected": " \n"}, "the rejected answer is empty", id="blank rejected"),
        pytest.param({**GOOD, "rejected": []}, "the rejected answer is empty", id="no rejected turns"),
        pytest.param({**GOOD, "chosen": " Go away.\n"}, "the same answer", id="chosen equals rejected"),
        pytest.param({"prompt": "Hi", "chosen": {"role": "user", "content": "Hello!"}, "rejected": "Go away."},
                     "'chosen' is a 'user' turn", id="chosen is a user turn"),
        pytest.param({"prompt": "Hi", "chosen": "Hello!", "rejected": [GO_AWAY, HI]},
                     "'rejected[1]' is a 'user' turn", id="rejected holds a user turn"),
        pytest.param({"prompt": [HI, HELLO], "chosen": "Hello again!", "rejected": "Go away."},
                     "must end with a user turn", id="prompt ends with the assistant"),
        pytest.param({"prompt": "Hi", "chosen": {"role": "pirate", "content": "Arr"}, "rejected": "Go away."},
                     "unknown role 'pirate'", id="unknown role"),
        pytest.param({**GOOD, "prompt": 42}, "'prompt' must be a string", id="prompt a number"),
        pytest.param({"chosen": [HI, HELLO], "rejected": [{"role": "user", "content": "Yo"}, GO_AWAY]},
                     "start with the same prompt turns", id="implicit prompt with nothing shared"),
        pytest.param({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "human", "value": "Hello!"},
                      "rejected": "Go away."}, "'chosen' is a 'user' turn", id="sharegpt chosen from human"),
        pytest.param({"conversations": [], "chosen": "Hello!", "rejected": "Go away."}, "the prompt is empty",
                     id="sharegpt without turns"),
    ],
)  # fmt: skip
def test_each_bad_pair_is_a_coded_error_with_its_line(tmp_path, row, reason):
    path = jsonl(tmp_path, [GOOD, "", row])  # a blank line: the bad row is line 3
    with pytest.raises(BackpropError) as caught:
        load_dataset(path)
    assert caught.value.code == "INPUT_DATASET_BAD_PAIR"
    assert caught.value.fields["line"] == 3 and caught.value.message.startswith(f"{path}:3: ")
    assert reason in caught.value.message


def test_a_csv_pair_with_an_empty_rejected_cell_names_its_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"Hi,\nthere",Hello!,Go away.\nWhere is it?,"Just here, sir.",\n')
    with pytest.raises(BackpropError) as caught:
        load_dataset(path)
    assert caught.value.code == "INPUT_DATASET_BAD_PAIR" and caught.value.fields["line"] == 4
    assert caught.value.message == f"{path}:4: 'rejected' is missing: a preference row needs a chosen and a rejected answer"


def test_a_csv_pair_may_hold_its_messages_as_json_cells(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        import csv

        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow([json.dumps([SYSTEM, HI]), json.dumps(HELLO), "[not a message] but an answer"])
    example = load_dataset(path).examples[0]
    assert (example.prompt, example.chosen) == ([SYSTEM, HI], [HELLO])
    assert example.rejected == [{"role": "assistant", "content": "[not a message] but an answer"}]


def test_a_parquet_pair_with_equal_answers_names_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["Hi", "Yo"], "chosen": ["Hello!", "Hey."], "rejected": ["Go away.", "Hey. "]}), path)
    report = scan(path)
    assert (report.valid_rows, report.pairs) == (1, 1)
    assert [(e.line, e.code) for e in report.errors] == [(2, "INPUT_DATASET_BAD_PAIR")]
    assert "chosen and rejected are the same answer" in report.errors[0].reason


def test_conversational_pairs_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [SYSTEM, HI], "chosen": [HELLO], "rejected": [GO_AWAY]}]), path)
    example = load_dataset(path).examples[0]
    assert (example.prompt, example.chosen, example.rejected) == ([SYSTEM, HI], [HELLO], [GO_AWAY])


def test_skip_invalid_keeps_the_good_pairs_and_reports_each_skipped_pair_row(tmp_path):
    path = jsonl(tmp_path, [GOOD, {"prompt": "Hi", "chosen": "Hello!"}, GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    dataset = load_dataset(path, skip_invalid=True)
    assert [e.line for e in dataset.examples] == [1, 3]
    assert dataset.report.pairs == 2 and dataset.report.error_count == 2
    assert [(e["line"], e["code"]) for e in dataset.report.to_dict()["errors"]] == [
        (2, "INPUT_DATASET_BAD_PAIR"),
        (4, "INPUT_DATASET_BAD_PAIR"),
    ]
    with pytest.raises(BackpropError, match=r"pairs.jsonl:2: 'rejected' is missing.*and 1 more bad rows"):
        load_dataset(path)


def test_preference_methods_refuse_a_file_with_sft_rows_naming_the_first(tmp_path):
    path = jsonl(tmp_path, [GOOD, GOOD, {"messages": [HI, HELLO]}, {"prompt": "Hi", "completion": "Hello!"}])
    dataset = load_dataset(path)
    assert (dataset.report.pairs, dataset.report.valid_rows) == (2, 4)
    with pytest.raises(BackpropError) as caught:
        require_preference(dataset, "dpo")
    assert caught.value.code == "INPUT_DATASET_NOT_PREFERENCE" and caught.value.fields["line"] == 3
    assert caught.value.message == (
        f"{path}: --method dpo trains on preference pairs, and line 3 is a openai row, not a pair (prompt, chosen, rejected)"
    )
    require_preference(load_dataset(jsonl(tmp_path, [GOOD, GOOD], name="only-pairs.jsonl")), "orpo")  # all pairs: accepted


def test_sft_on_a_pair_trains_on_the_chosen_conversation(tmp_path, tiny_model_dir):
    from training.datasets import Example
    from training.packing import IGNORE, ChatEncoder

    tokenizer = demo_tokenizer(tiny_model_dir)
    pair = load_dataset(jsonl(tmp_path, [{"prompt": [SYSTEM, HI], "chosen": HELLO, "rejected": GO_AWAY}])).examples[0]
    encode = ChatEncoder(tokenizer, 256)
    encoded = encode(pair)
    chat = encode(Example([SYSTEM, HI, HELLO], 1, "openai"))
    assert (encoded.input_ids, encoded.labels) == (chat.input_ids, chat.labels)
    assert "Go away" not in tokenizer.decode(encoded.input_ids)
    trained = tokenizer.decode([t for t in encoded.labels if t != IGNORE])
    assert trained.startswith(HELLO["content"]) and "Hi" not in trained


def test_the_template_check_covers_both_conversations_of_a_pair(tmp_path, tiny_model_dir):
    tokenizer = demo_tokenizer(tiny_model_dir)
    # Mistral's rule: roles alternate user/assistant; a rejected answer of two assistant turns breaks it, the chosen one not.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = [GOOD, {"prompt": "Hi", "chosen": "Hello!", "rejected": [GO_AWAY, {"role": "assistant", "content": "Really."}]}]
    report = scan(jsonl(tmp_path, rows), tokenizer=tokenizer)
    assert (report.valid_rows, report.pairs) == (1, 1)
    [error] = report.errors
    assert (error.line, error.code) == (2, "INPUT_DATASET_TEMPLATE_ERROR")
    assert error.reason.startswith("the rejected conversation: ") and "must alternate" in error.reason


def test_token_stats_of_a_pair_count_the_prompt_and_the_chosen_answer(tmp_path, tiny_model_dir):
    from training import chat_template

    tokenizer = demo_tokenizer(tiny_model_dir)
    row = {"prompt": "Hi", "chosen": "Hello! Nice to meet you, I hope your day goes well.", "rejected": "No."}
    path = jsonl(tmp_path, [row])
    report = scan(path, tokenizer=tokenizer)
    chosen = tokenizer(chat_template.render(tokenizer, [HI, said(row["chosen"])]), add_special_tokens=False)
    example = load_dataset(path).examples[0]
    assert report.tokens.count == 1 and report.tokens.total == len(chosen["input_ids"]) == len(render_tokens(tokenizer, example))


def test_the_shipped_example_file_is_all_valid_pairs(tiny_model_dir):
    report = scan(ROOT / "assets" / "preferences_example.jsonl", tokenizer=demo_tokenizer(tiny_model_dir))
    assert report.error_count == 0 and report.pairs == report.rows >= 8
    dataset = load_dataset(ROOT / "assets" / "preferences_example.jsonl")
    require_preference(dataset, "dpo")
    assert {e.prompt_turns for e in dataset.examples} > {1}  # plain and conversational rows mixed


def test_backprop_validate_reports_pairs(home, tmp_path):
    path = jsonl(tmp_path, [GOOD, {"messages": [HI, HELLO]}, {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello! "}, GOOD])
    result = backprop("validate", str(path), "--json")
    assert result.returncode == 3, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["rows"], report["valid_rows"], report["pairs"]) == (4, 3, 2)
    assert report["formats"] == {"preference": 2, "openai": 1} and report["tokens"]["count"] == 3
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(3, "INPUT_DATASET_BAD_PAIR")]

    human = backprop("validate", str(ROOT / "assets" / "preferences_example.jsonl"), "--format", "preference")
    assert human.returncode == 0, human.stdout + human.stderr
    assert "8 preference pairs" in human.stdout and "tokens, prompt + chosen" in human.stdout
