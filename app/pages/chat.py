"""Chat: pick a run's adapter, merged or GGUF export (or type a folder); streaming replies; beside the base model if asked."""

from __future__ import annotations

import reflex as rx

from app.components.layout import page
from app.state.chat import ChatState


def message(m: rx.Var) -> rx.Component:
    mine = m["role"] == "user"
    return rx.hstack(
        rx.box(
            rx.text(rx.cond(mine, "you", "tuned model"), size="1", weight="bold", color_scheme="gray"),
            rx.text(m["content"], white_space="pre-wrap", class_name=rx.cond(mine, "", "reply")),
            background=rx.cond(mine, rx.color("accent", 3), rx.color("gray", 3)), padding="8px 12px", border_radius="12px",
            max_width="70%",
        ),
        rx.cond(~mine & (m["base"] != ""), rx.box(
            rx.text("base model", size="1", weight="bold", color_scheme="gray"),
            rx.text(m["base"], white_space="pre-wrap", class_name="base-reply"),
            background=rx.color("orange", 3), padding="8px 12px", border_radius="12px", max_width="45%",
        )),
        justify=rx.cond(mine, "end", "start"), width="100%", align="start",
    )  # fmt: skip


def chat_page() -> rx.Component:
    return page(
        "Chat",
        rx.cond(ChatState.sources.length() == 0, rx.text(
            "No tuned model yet: train one on the Train page, then chat with it here (or type a model folder or .gguf file).",
            color_scheme="gray")),
        rx.vstack(
            rx.hstack(
                rx.select(ChatState.sources, value=ChatState.source, on_change=ChatState.set_source,
                          id="chat-source"),
                rx.input(value=ChatState.folder, on_change=ChatState.set_folder,
                         placeholder="or a folder or .gguf file", width="220px", id="chat-folder"),
                rx.checkbox("Side by side with the base model", checked=ChatState.compare,
                            on_change=ChatState.set_compare),
                rx.button("Clear", on_click=ChatState.clear, variant="soft"),
                align="center", wrap="wrap",
            ),
            rx.vstack(rx.foreach(ChatState.messages, message), width="100%", id="chat-messages"),
            rx.form(
                rx.hstack(
                    rx.input(value=ChatState.prompt, on_change=ChatState.set_prompt,
                             placeholder="Ask something...", width="100%", id="chat-input"),
                    rx.button("Send", type="submit", loading=ChatState.busy, id="chat-send"),
                    width="100%",
                ),
                on_submit=lambda _: ChatState.send, reset_on_submit=False, width="100%",
            ),
            rx.cond(ChatState.error != "", rx.callout(ChatState.error, color_scheme="red", id="chat-error")),
            width="100%",
        ),
    )  # fmt: skip
