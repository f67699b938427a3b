"""Chat: pick a run's adapter, merged or GGUF export (or type a folder); streaming replies; beside the base model if asked.
Side by side with a run's adapter, each pair of replies can be voted on, and the votes trained on (DPO)."""

from __future__ import annotations

import reflex as rx

from app.components.layout import page
from app.state.chat import ChatState


def vote_bar(m: rx.Var, i: rx.Var) -> rx.Component:
    """Under a finished pair of replies: which is better, or a better answer written here."""
    voted = rx.match(m["vote"], ("tuned", "Voted: tuned is better"), ("base", "Voted: base is better"),
                     ("user", "Your better answer is saved"), "")  # fmt: skip
    return rx.vstack(
        rx.cond(
            m["vote"] != "",
            rx.text(voted, size="1", color_scheme="green", class_name="vote-done"),
            rx.hstack(
                rx.cond(
                    m["same"] == "1",
                    rx.text("Both answers are the same: nothing to prefer.", size="1", color_scheme="gray"),
                    rx.fragment(
                        rx.button("Tuned is better", on_click=ChatState.vote(i, "tuned"), size="1", variant="soft",
                                  class_name="vote-tuned"),
                        rx.button("Base is better", on_click=ChatState.vote(i, "base"), size="1", variant="soft",
                                  color_scheme="orange", class_name="vote-base"),
                    ),
                ),
                rx.button("Write a better one", on_click=ChatState.write_better(i), size="1", variant="outline",
                          class_name="vote-write"),
                align="center",
            ),
        ),
        rx.cond(ChatState.correcting == i, rx.vstack(
            rx.text_area(value=ChatState.correction, on_change=ChatState.edit_correction, width="100%", rows="3",
                         placeholder="The answer you would have liked", id="chat-correction"),
            rx.hstack(rx.button("Save", on_click=ChatState.save_correction, size="1", id="chat-save-correction"),
                      rx.button("Cancel", on_click=ChatState.cancel_correction, size="1", variant="soft")),
            width="70%",
        )),
        width="100%", spacing="1",
    )  # fmt: skip


def votes_bar() -> rx.Component:
    """How many votes the picked run has, and the button that trains on them."""
    few = ChatState.votes < 2
    return rx.hstack(
        rx.text(ChatState.votes, rx.cond(ChatState.votes == 1, " vote for ", " votes for "), ChatState.vote_run, size="2",
                id="chat-votes"),
        rx.button("Train on my votes", on_click=ChatState.train_on_votes, disabled=few, loading=ChatState.training,
                  size="1", id="chat-train-votes"),
        rx.cond(few, rx.text("Vote on at least 2 side-by-side replies to train on them (DPO from this run).", size="1",
                             color_scheme="gray", id="chat-votes-hint")),
        align="center", wrap="wrap",
    )  # fmt: skip


def message(m: rx.Var, i: rx.Var) -> rx.Component:
    mine = m["role"] == "user"
    pair = rx.hstack(
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
    return rx.vstack(pair, rx.cond(~mine & (m["run"] != "") & (m["done"] == "1"), vote_bar(m, i)), width="100%",
                     spacing="1")  # fmt: skip


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
            rx.cond(ChatState.vote_run != "", votes_bar()),
            rx.cond(ChatState.vote_error != "", rx.callout(ChatState.vote_error, color_scheme="red", id="chat-vote-error")),
            rx.vstack(rx.foreach(ChatState.messages, lambda m, i: message(m, i)), width="100%", id="chat-messages"),
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
