"""Tool calls in chat data: parsed, checked against the model's chat template per line, and trained on the assistant
turns only (the calls included), never on the tool results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import backprop, write_lines

from training.chat_template import CHATML_TOOLS_TEMPLATE, segments, tool_support
from training.datasets import load_dataset, scan
from training.errors import BackpropError
from training.packing import IGNORE, ChatEncoder

# Qwen2.5-Instruct's chat template, verbatim from its tokenizer_config.json: the most common template that renders
# tool definitions, calls and results (results grouped in one user turn of <tool_response> blocks).
QWEN25_TEMPLATE = (Path(__file__).parent / "templates" / "qwen2.5-instruct.jinja").read_text()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_row(city: str, temp: int, call_id: str = "call_1") -> dict:
    """An agent conversation in OpenAI's format: the call's arguments as a JSON string, as the API returns them."""
    return {
        "messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}},
            ]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temp_c": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ],
        "tools": [WEATHER],
    }  # fmt: skip


def jsonl(path: Path, rows: list) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


@pytest.fixture
def qwen_tokenizer(tiny_model_dir):
    """A real byte-level BPE tokenizer (the demo model's) with Qwen2.5's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = QWEN25_TEMPLATE
    return tokenizer


@pytest.fixture
def demo_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- reading tool use


def test_openai_tool_calls_tool_results_and_tools_normalize_with_parsed_arguments(tmp_path):
    dataset = load_dataset(jsonl(tmp_path / "agent.jsonl", [tool_row("Paris", 18)]))
    example = dataset.examples[0]
    assert dataset.report.format == "openai" and example.tools == [WEATHER] and example.uses_tools
    assert example.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_1"}],
    }  # arguments parsed: templates render them with tojson, a string would be rendered as one quoted string
    assert example.messages[2] == {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_1"}
    assert example.to_record() == {"messages": example.messages, "tools": [WEATHER]}  # how multi-run writes windows


def test_sharegpt_function_call_and_observation_turns_become_tool_calls_and_results(tmp_path):
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
            {"from": "observation", "value": json.dumps({"temp_c": 25})},
            {"from": "gpt", "value": "25 degrees."},
        ],
        "tools": json.dumps([WEATHER]),  # agent datasets often store the definitions as a JSON string
    }
    example = load_dataset(jsonl(tmp_path / "agent.jsonl", [row])).examples[0]
    assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert example.tools == [WEATHER]


def _with(row: dict, index: int, **changes) -> dict:
    messages = [dict(m) for m in row["messages"]]
    messages[index].update(changes)
    return {**row, "messages": messages}


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"messages": tool_row("Paris", 18)["messages"][2:]}, "turn 1 is a tool result, but the turn before it calls no tool"),
        (
            _with(tool_row("Paris", 18), 1, tool_calls=[{"function": {"name": "get_weather", "arguments": "{city: Paris"}}]),
            "'messages[1].tool_calls[0].function.arguments' is not valid JSON",
        ),
        (_with(tool_row("Paris", 18), 0, tool_calls=[{"function": {"name": "f"}}]), "only assistant turns can call tools"),
        (_with(tool_row("Paris", 18), 1, tool_calls=[{"function": {"arguments": {}}}]), "names no function"),
        ({**tool_row("Paris", 18), "tools": {"name": "get_weather"}}, "'tools' must be a list"),
    ],
)
def test_malformed_tool_use_is_a_coded_error_with_file_and_line(tmp_path, bad, words):
    path = jsonl(tmp_path / "agent.jsonl", [tool_row("Paris", 18), bad])
    with pytest.raises(BackpropError) as caught:
        load_dataset(path)
    assert caught.value.code == "INPUT_DATASET_INVALID_ROW"
    assert f"{path}:2:" in caught.value.message and words in caught.value.message


# ---------------------------------------------------------------- what a template can render


def test_the_demo_models_chatml_cannot_render_tool_calls_and_each_such_line_says_so(tmp_path, demo_tokenizer):
    """Plain ChatML renders message contents only: the calls and the definitions would silently vanish."""
    assert tool_support(demo_tokenizer) == tool_support(demo_tokenizer).__class__(calls=False, results=True, definitions=False)
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = jsonl(tmp_path / "agent.jsonl", [plain, tool_row("Paris", 18), plain, tool_row("Rome", 25)])

    report = scan(path, tokenizer=demo_tokenizer)
    assert report.valid_rows == 2 and [(e.line, e.code) for e in report.errors] == [
        (2, "INPUT_DATASET_TOOLS_UNSUPPORTED"),
        (4, "INPUT_DATASET_TOOLS_UNSUPPORTED"),
    ]
    assert "does not render tool calls (assistant 'tool_calls') or tool definitions" in report.errors[0].reason

    with pytest.raises(BackpropError) as caught:
        load_dataset(path, tokenizer=demo_tokenizer)
    assert caught.value.code == "INPUT_DATASET_TOOLS_UNSUPPORTED" and caught.value.exit_code == 1
    assert caught.value.message.startswith(f"{path}:2: ") and "(and 1 more bad rows)" in caught.value.message
    assert "Qwen2.5" in caught.value.hint
    assert [e.line for e in load_dataset(path, skip_invalid=True, tokenizer=demo_tokenizer).examples] == [1, 3]
    assert len(load_dataset(path).examples) == 4  # without a tokenizer only the rows themselves are checked

    with pytest.raises(BackpropError) as caught:  # the encoder refuses too, whoever calls it
        ChatEncoder(demo_tokenizer, 1024)(load_dataset(path).examples[1])
    assert caught.value.code == "INPUT_DATASET_TOOLS_UNSUPPORTED" and f"{path}:2:" in caught.value.message


def test_backprop_validate_lists_every_line_the_models_template_cannot_render(home, tmp_path):
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = jsonl(tmp_path / "agent.jsonl", [tool_row("Paris", 18), plain, tool_row("Rome", 25)])
    result = backprop("validate", str(path), "--model", "demo")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"{path}:1: the model's chat template does not render tool calls" in result.stdout
    assert f"{path}:3: " in result.stdout and "[INPUT_DATASET_TOOLS_UNSUPPORTED]" in result.stdout
    assert backprop("validate", str(path), "--no-tokens").returncode == 0  # no model named, no template to check


def test_a_template_that_raises_on_a_conversation_is_a_coded_error_for_that_line(tmp_path, demo_tokenizer):
    demo_tokenizer.chat_template = (  # like Gemma's and Mistral's: no system role, strict alternation
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Yo"}]}  # fmt: skip
    report = scan(jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "Yo"}, system]), tokenizer=demo_tokenizer)
    assert [(e.line, e.code) for e in report.errors] == [(2, "INPUT_DATASET_TEMPLATE_ERROR")]
    assert "System role not supported" in report.errors[0].reason


def test_tool_results_are_never_trained_when_the_template_cannot_keep_turns_apart(tmp_path, demo_tokenizer):
    """A template that renders earlier turns differently once later ones follow cannot be cut at the turns. Plain
    chats then train on every token (as before); a conversation with tool results is refused instead."""
    demo_tokenizer.chat_template = QWEN25_TEMPLATE.replace(
        "{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
        "{{- '<|im_end|>\\n' }}{%- if loop.last %}{{- '<|endoftext|>' }}{%- endif %}\n    {%- elif message.role == \"tool\" %}",
    )
    assert "loop.last %}{{- '<|endoftext|>'" in demo_tokenizer.chat_template
    path = jsonl(tmp_path / "agent.jsonl", [tool_row("Paris", 18)])
    report = scan(path, tokenizer=demo_tokenizer)
    assert [(e.line, e.code) for e in report.errors] == [(1, "INPUT_DATASET_TOOLS_UNSUPPORTED")]
    assert "tool results cannot be kept out of the loss" in report.errors[0].reason
    with pytest.raises(BackpropError, match="cannot be kept out of the loss"):
        ChatEncoder(demo_tokenizer, 2048)(load_dataset(path).examples[0])


def test_tokenizers_without_a_template_get_chatml_that_renders_tools_and_plain_chats_unchanged(tmp_path, tiny_model_dir):
    from training.demo_model import CHATML_TEMPLATE
    from training.models import ModelSource, load_tokenizer

    folder = tmp_path / "base-model"  # a base model: tokenizer files without a chat template
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    tokenizer = load_tokenizer(ModelSource("base", str(folder), True))
    assert tokenizer.chat_template == CHATML_TOOLS_TEMPLATE
    assert tool_support(tokenizer) == tool_support(tokenizer).__class__(calls=True, results=True, definitions=True)
    chats = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
         {"role": "user", "content": "More?"}],
    ]  # fmt: skip
    for chat in chats:
        for generation in (False, True):
            plain = tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=generation, chat_template=CHATML_TEMPLATE
            )
            assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation) == plain

    example = load_dataset(jsonl(tmp_path / "agent.jsonl", [tool_row("Paris", 18)])).examples[0]
    pieces = segments(tokenizer, example.messages, example.tools)
    assert [text for text, kind in pieces if kind == "assistant"] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is 18 degrees in Paris.<|im_end|>\n",
    ]
    assert [text for text, kind in pieces if kind == "tool"] == ['<|im_start|>tool\n{"temp_c": 18}<|im_end|>\n']
    assert '"name": "get_weather", "description"' in "".join(text for text, kind in pieces if kind == "prompt")


# ---------------------------------------------------------------- masks, token by token


def _char_spans(ids: list[int], tokenizer) -> list[tuple[int, int]]:
    """Where each token's text lies in the decoded whole (ASCII data: every token decodes on its own)."""
    spans, at = [], 0
    for token in ids:
        piece = tokenizer.decode([token])
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans


def test_assistant_tool_calls_are_trained_and_tool_results_masked_token_by_token(tmp_path, qwen_tokenizer):
    row = tool_row("Paris", 18)
    second_result = {"role": "tool", "tool_call_id": "call_2", "content": json.dumps({"humidity": 40})}
    second_call = {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}
    row["messages"][1]["tool_calls"].append(second_call)  # two calls, two results grouped in one turn by Qwen2.5
    row["messages"].insert(3, second_result)
    example = load_dataset(jsonl(tmp_path / "agent.jsonl", [row]), tokenizer=qwen_tokenizer).examples[0]

    encoded = ChatEncoder(qwen_tokenizer, 4096)(example)
    text = qwen_tokenizer.decode(encoded.input_ids)
    assert text == qwen_tokenizer.apply_chat_template(example.messages, tools=example.tools, tokenize=False)

    calls = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call><|im_end|>\n'
    )
    answer = "It is 18 degrees in Paris.<|im_end|>\n"
    results = '<tool_response>\n{"temp_c": 18}\n</tool_response>\n<tool_response>\n{"humidity": 40}\n</tool_response>'
    trained_spans = [(text.index(calls), text.index(calls) + len(calls)), (text.index(answer), text.index(answer) + len(answer))]
    results_span = (text.index(results), text.index(results) + len(results))

    for (start, end), token, label in zip(_char_spans(encoded.input_ids, qwen_tokenizer), encoded.input_ids, encoded.labels,
                                          strict=True):  # fmt: skip
        inside_reply = any(s <= start and end <= e for s, e in trained_spans)
        assert label == (token if inside_reply else IGNORE), (text[start:end], label)
        if results_span[0] <= start < results_span[1]:
            assert label == IGNORE
    trained = qwen_tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE])
    assert trained == calls + answer
    assert "temp_c" not in trained and "humidity" not in trained and 'get_weather", "description' not in trained


# ---------------------------------------------------------------- a real training run


CITIES = [("Paris", 18), ("Rome", 25), ("Berlin", 12), ("Madrid", 30), ("Lisbon", 22), ("Vienna", 15),
          ("Prague", 11), ("Athens", 28), ("Dublin", 9), ("Oslo", 5), ("Warsaw", 13), ("Bern", 14)]  # fmt: skip


@pytest.mark.slow
def test_training_on_a_tool_call_dataset_with_a_tool_capable_template(home, tmp_path, tiny_model_dir):
    from training import Trainer
    from training.events import read_events

    model = tmp_path / "tool-model"  # the demo model's weights and tokenizer with Qwen2.5's template
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    data = jsonl(tmp_path / "agent.jsonl", [tool_row(city, temp, f"call_{i}") for i, (city, temp) in enumerate(CITIES)])

    result = Trainer(str(model)).train(data, steps=12, lr=3e-3, batch_size=4, max_seq_length=1024)
    assert result.status == "completed" and result.steps == 12 and result.adapter_path is not None
    events, _ = read_events(Path(result.run_dir) / "events.jsonl")
    started = next(e for e in events if e["event"] == "started")
    assert started["examples"] == len(CITIES)
    assert not any(e["event"] == "log" and "trained on every token" in e.get("message", "") for e in events)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first, result.losses

    with pytest.raises(BackpropError) as caught:  # the demo model's plain ChatML: refused before any training
        Trainer("demo").train(data, steps=2)
    assert caught.value.code == "INPUT_DATASET_TOOLS_UNSUPPORTED" and f"{data}:1:" in caught.value.message


def test_training_on_every_token_still_leaves_the_tool_results_out(tmp_path, qwen_tokenizer):
    """response_only off trains the prompts too; tool results stay masked: they are the world's words, not the model's."""
    example = load_dataset(jsonl(tmp_path / "agent.jsonl", [tool_row("Rome", 25)]), tokenizer=qwen_tokenizer).examples[0]
    encoded = ChatEncoder(qwen_tokenizer, 4096, response_only=False)(example)
    text = qwen_tokenizer.decode(encoded.input_ids)
    results = '<|im_start|>user\n<tool_response>\n{"temp_c": 25}\n</tool_response><|im_end|>\n'
    results_span = (text.index(results), text.index(results) + len(results))
    for (start, end), token, label in zip(_char_spans(encoded.input_ids, qwen_tokenizer), encoded.input_ids, encoded.labels,
                                          strict=True):  # fmt: skip
        inside_results = results_span[0] <= start and end <= results_span[1]
        assert label == (IGNORE if inside_results else token), (text[start:end], label)
    trained = qwen_tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE])
    assert trained == text.replace(results, "") and "What is the weather in Rome?" in trained
