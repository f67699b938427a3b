"""What a model's chat template can render, and a conversation cut into trained and untrained text.

Tool use (OpenAI function calling) reaches the template as assistant `tool_calls`, `tool` messages and a
row-level `tools` list. Templates differ: Qwen2.5's renders all three, plain ChatML (the demo model's, and the
fallback for tokenizers without a template) renders a tool result as a turn but silently drops the calls and
the definitions. Training on such a rendering would teach empty assistant turns, so `problem()` refuses a
conversation whose tool parts the template would drop, and says which.

    support = tool_support(tokenizer)            # probed once per template: calls, results, definitions
    problem(tokenizer, messages, tools)          # None, or (code, reason) for this conversation
    segments(tokenizer, messages, tools)         # [(text, kind), ...]: "assistant", "tool" or "prompt" pieces
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOOLS_UNSUPPORTED = "INPUT_DATASET_TOOLS_UNSUPPORTED"
TEMPLATE_ERROR = "INPUT_DATASET_TEMPLATE_ERROR"

# The template a tokenizer without one gets: ChatML, rendering every conversation without tools exactly as plain
# ChatML does, plus tool use in the Hermes convention that Qwen2.5 also follows (definitions in the system turn,
# calls as <tool_call> JSON in the assistant turn, results as "tool" turns).
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls is defined and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- set function = call.function if call.function is defined else call %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\\\"name\\\": \\\"' + function.name + '\\\", \\\"arguments\\\": ' }}"
    "{{- (function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)  # fmt: skip

# Marker words that survive any escaping a template applies (tojson, quoting), so their presence in the
# rendering proves the part was rendered. The call id has the 9 alphanumeric characters Mistral's template demands.
_PROBE_TOOLS = [
    {"type": "function", "function": {"name": "probedefzq", "description": "d", "parameters": {"type": "object"}}},
]
_PROBE = [
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "probe0001", "type": "function", "function": {"name": "probecallzq", "arguments": {"probeargzq": 1}}},
    ]},
    {"role": "tool", "tool_call_id": "probe0001", "name": "probecallzq", "content": "proberesultzq"},
    {"role": "assistant", "content": "a"},
]  # fmt: skip


@dataclass(frozen=True)
class ToolSupport:
    calls: bool  # assistant tool_calls appear in the rendering
    results: bool  # tool messages appear
    definitions: bool  # the row's `tools` list appears
    reason: str = ""  # why not, when the template raised on the probe


class NotPrefixStable(Exception):
    """Rendering a conversation's first turns is not a prefix of rendering it whole: turns cannot be cut apart."""


_support_cache: dict[str, ToolSupport] = {}


def tool_support(tokenizer: Any) -> ToolSupport:
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _support_cache:
        _support_cache[template] = _probe(tokenizer)
    return _support_cache[template]


def _probe(tokenizer: Any) -> ToolSupport:
    try:
        text = render(tokenizer, _PROBE, _PROBE_TOOLS)
    except Exception:  # a template may refuse a tools list yet render calls without one
        try:
            text = render(tokenizer, _PROBE)
        except Exception as exc:  # jinja raises TemplateError, TypeError, ...: all mean "cannot render tools"
            return ToolSupport(False, False, False, reason=_first_line(exc))
    calls = "probecallzq" in text and "probeargzq" in text
    return ToolSupport(calls=calls, results="proberesultzq" in text, definitions="probedefzq" in text)


def uses_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def missing_tool_parts(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str | None:
    """Which tool parts of this conversation the template would drop, as a reason; None when it renders them all."""
    if not uses_tools(messages, tools):
        return None
    support = tool_support(tokenizer)
    missing = [
        what
        for what, needed, rendered in (
            ("tool calls (assistant 'tool_calls')", any(m.get("tool_calls") for m in messages), support.calls),
            ("tool results ('tool' messages)", any(m["role"] == "tool" for m in messages), support.results),
            ("tool definitions (the row's 'tools')", bool(tools), support.definitions),
        )
        if needed and not rendered
    ]
    if not missing:
        return None
    why = f" ({support.reason})" if support.reason else ""
    return f"the model's chat template does not render {' or '.join(missing)}{why}"


UNSTABLE = (
    "the model's chat template renders this conversation's turns differently once later turns follow, "
    "so the tool results cannot be kept out of the loss"
)


def problem(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    """Why this tokenizer's template cannot train on this conversation, as (error code, reason), or None."""
    missing = missing_tool_parts(tokenizer, messages, tools)
    if missing:
        return TOOLS_UNSUPPORTED, missing
    try:
        if uses_tools(messages, tools):  # tool results must be cut out of the loss exactly
            segments(tokenizer, messages, tools)
        else:
            render(tokenizer, messages)
    except NotPrefixStable:
        return TOOLS_UNSUPPORTED, UNSTABLE
    except Exception as exc:  # the template's own raise_exception (e.g. "roles must alternate") or a type error
        return TEMPLATE_ERROR, template_error(exc)
    return None


def template_error(exc: Exception) -> str:
    return f"the model's chat template cannot render this conversation: {_first_line(exc)}"


def render(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False
) -> str:
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def segments(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[tuple[str, str]]:
    """The rendered conversation as (text, kind) pieces, kind one of: "assistant" (a reply, its tool calls included, up
    to its end-of-turn marker), "tool" (a run of tool results with the markers around them) and "prompt" (everything
    else: system and user turns, the header that opens an assistant turn).

    Cuts are taken only around assistant turns and around whole runs of tool results: templates that group
    consecutive tool results in one block (Qwen2.5) close that block only when the next turn is not a tool result,
    so a cut between two tool results would not be stable. Raises NotPrefixStable when a cut does not line up.
    """
    pieces: list[tuple[str, str]] = []
    done = ""

    def upto(text: str, kind: str) -> None:
        nonlocal done
        if not text.startswith(done):
            raise NotPrefixStable(f"turn {i + 1}")
        pieces.append((text[len(done) :], kind))
        done = text

    i = 0
    while i < len(messages):
        role = messages[i]["role"]
        if role == "assistant":
            upto(render(tokenizer, messages[:i], tools, add_generation_prompt=True), "prompt")
            upto(render(tokenizer, messages[: i + 1], tools), "assistant")
            i += 1
        elif role == "tool":
            end = i + 1
            while end < len(messages) and messages[end]["role"] == "tool":
                end += 1
            upto(render(tokenizer, messages[:i], tools), "prompt")
            upto(render(tokenizer, messages[:end], tools), "tool")
            i = end
        else:
            i += 1
    upto(render(tokenizer, messages, tools), "prompt")
    return [(text, kind) for text, kind in pieces if text]


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
