"""Dataset: upload (drag and drop), format detection, chat-bubble preview, statistics, bad lines, split."""

from __future__ import annotations

import reflex as rx

from app.components.layout import page
from app.state.dataset import DatasetState

ACCEPT = {"application/octet-stream": [".jsonl", ".json", ".csv", ".parquet", ".txt", ".md"]}


def bubble(message: rx.Var) -> rx.Component:
    mine = message["role"] == "user"
    return rx.hstack(
        rx.box(
            rx.text(message["role"], size="1", weight="bold", color_scheme="gray"),
            rx.text(message["content"], size="2", white_space="pre-wrap"),
            background=rx.cond(mine, rx.color("accent", 3), rx.color("gray", 3)), padding="8px 12px", border_radius="12px",
            max_width="80%",
        ),
        justify=rx.cond(mine, "end", "start"), width="100%",
    )  # fmt: skip


def conversation_card(conversation: rx.Var) -> rx.Component:
    return rx.card(rx.vstack(rx.foreach(conversation, bubble), width="100%"), width="100%")


def answer(title: str, messages: rx.Var, color: str, class_name: str) -> rx.Component:
    """One answer of a pair, in its colour: chosen green, rejected red."""
    return rx.box(
        rx.text(title, size="1", weight="bold", color=rx.color(color, 11)),
        rx.foreach(messages, lambda m: rx.text(m["content"], size="2", white_space="pre-wrap")),
        background=rx.color(color, 3), border=f"1px solid {rx.color(color, 7)}", padding="8px 12px", border_radius="12px",
        class_name=class_name, width="100%",
    )  # fmt: skip


def pair_card(pair: rx.Var) -> rx.Component:
    """A preference pair: the prompt, then the chosen answer (left) beside the rejected one (right)."""
    return rx.card(
        rx.vstack(
            rx.foreach(pair["prompt"], bubble),
            rx.grid(answer("chosen", pair["chosen"], "green", "pair-chosen"),
                    answer("rejected", pair["rejected"], "red", "pair-rejected"), columns="2", spacing="3", width="100%"),
            width="100%",
        ),
        width="100%", class_name="pair",
    )  # fmt: skip


def piece(part: rx.Var) -> rx.Component:
    """A run of the row's text: trained tokens highlighted, context dimmed, tokens beyond the max length struck out."""
    return rx.text.span(
        part["text"], class_name="row-" + part["kind"].to(str),
        background=rx.match(part["kind"], ("trained", rx.color("green", 4)), ("cut", rx.color("red", 3)), "transparent"),
        opacity=rx.cond(part["kind"] == "context", "0.55", "1"),
        text_decoration=rx.cond(part["kind"] == "cut", "line-through", "none"),
    )  # fmt: skip


def row_card() -> rx.Component:
    """ "What the model sees": one row as training encodes it, with the model's own chat template and tokenizer."""
    return rx.card(
        rx.vstack(
            rx.hstack(
                rx.text("What the model sees", size="2", weight="bold"),
                rx.text("line", size="2"),
                rx.input(value=DatasetState.row_line, on_change=DatasetState.set_row_line, width="80px", id="row-line"),
                rx.button("Show", on_click=DatasetState.show_row, loading=DatasetState.row_busy, id="row-show"),
                rx.text(DatasetState.row_summary, size="2", color_scheme="gray", id="row-summary"),
                align="center", wrap="wrap",
            ),
            rx.text("green: trained on (the replies and their end-of-turn token); dimmed: read but not trained; struck "
                    "out: beyond the max length, cut", size="1", color_scheme="gray"),
            rx.cond(DatasetState.row_error != "", rx.callout(DatasetState.row_error, color_scheme="red", id="row-error")),
            rx.cond(DatasetState.row_problem != "", rx.callout(DatasetState.row_problem, color_scheme="red", id="row-problem")),
            rx.cond(DatasetState.row_note != "", rx.callout(DatasetState.row_note, color_scheme="amber", id="row-note")),
            rx.box(rx.foreach(DatasetState.row_pieces, piece), white_space="pre-wrap", font_family="monospace",
                   font_size="13px", width="100%", id="row-text"),
            width="100%", align="start",
        ),
        width="100%",
    )  # fmt: skip


def stat(label: str, key: str) -> rx.Component:
    return rx.vstack(rx.text(label, size="1", color_scheme="gray"), rx.text(DatasetState.report[key], weight="bold"), spacing="0")


def dataset_page() -> rx.Component:
    return page(
        "Dataset",
        rx.card(
            rx.vstack(
                rx.upload(
                    rx.vstack(rx.text("Drop a dataset here, or click to choose one"),
                              rx.text(".jsonl .json .csv .parquet .txt .md", size="1", color_scheme="gray"), align="center"),
                    id="dataset-upload", accept=ACCEPT, max_files=1, multiple=False, border="1px dashed",
                    max_size=DatasetState.max_upload_bytes, on_drop_rejected=DatasetState.rejected,
                    padding="24px", width="100%",
                ),
                rx.hstack(
                    rx.foreach(rx.selected_files("dataset-upload"), lambda f: rx.text(f, size="2")),
                    rx.button("Upload", on_click=DatasetState.handle_upload(rx.upload_files(upload_id="dataset-upload")),
                              id="upload-button"),
                    align="center",
                ),
                rx.cond(DatasetState.message != "", rx.text(DatasetState.message, color_scheme="green", size="2")),
                rx.cond(DatasetState.error != "", rx.callout(DatasetState.error, color_scheme="red", id="dataset-error")),
                rx.hstack(
                    rx.text("Or pick one already here:", size="2"),
                    rx.select(DatasetState.files, value=DatasetState.selected, on_change=DatasetState.select,
                              placeholder="no datasets yet", id="dataset-select"),
                    rx.text("Count tokens with the tokenizer of", size="2", id="dataset-model-label"),
                    rx.input(value=DatasetState.model, on_change=DatasetState.set_model, on_blur=DatasetState.inspect,
                             width="200px", id="dataset-model"),
                    align="center", wrap="wrap",
                ),
                width="100%",
            ),
            width="100%",
        ),
        rx.cond(DatasetState.busy, rx.hstack(rx.spinner(), rx.text("Reading the dataset..."))),
        rx.cond(
            DatasetState.report.contains("rows"),
            rx.vstack(
                rx.hstack(stat("format", "format"), stat("rows", "rows"), stat("valid", "valid"), stat("invalid", "invalid"),
                          stat("duplicates", "duplicates"), stat("turns", "turns"), stat("tokens", "tokens"),
                          spacing="6", wrap="wrap", id="dataset-stats"),
                rx.cond(DatasetState.pair_preview.length() > 0,
                        rx.text(DatasetState.report["pairs"], " preference pairs: for DPO or ORPO on the Train page", size="2",
                                weight="medium", color_scheme="green", id="dataset-pairs")),
                rx.text("Token lengths (", DatasetState.report["tokenizer"], " tokenizer)", size="2", weight="bold"),
                rx.vstack(rx.foreach(DatasetState.histogram, lambda b: rx.hstack(
                    rx.text(b["bucket"], size="1", width="60px"),
                    rx.box(background=rx.color("accent", 8), height="10px", width=b["width"]),
                    rx.text(b["rows"], size="1"), width="100%", align="center")), width="50%", spacing="1"),
                rx.cond(DatasetState.errors.length() > 0, rx.vstack(
                    rx.text("Bad lines", size="2", weight="bold", color_scheme="red"),
                    rx.foreach(DatasetState.errors, lambda e: rx.text("line ", e["line"], ": ", e["reason"], size="1",
                                                                     font_family="monospace")),
                    id="dataset-bad-lines", spacing="1")),
                row_card(),
                rx.text("Preview", size="2", weight="bold"),
                rx.vstack(rx.foreach(DatasetState.preview, conversation_card), rx.foreach(DatasetState.pair_preview, pair_card),
                          width="100%", id="dataset-preview"),
                rx.hstack(
                    rx.text("Validation fraction", size="2"),
                    rx.input(value=DatasetState.validation, on_change=DatasetState.set_validation, width="80px"),
                    rx.text(DatasetState.split_text, size="2", color_scheme="gray"),
                    rx.button("Use for training", on_click=DatasetState.use_for_training, id="use-for-training"),
                    align="center", wrap="wrap",
                ),
                width="100%", align="start",
            ),
            rx.cond(~DatasetState.busy, rx.text("Upload a dataset or pick one to see its format, statistics and a preview.",
                                                color_scheme="gray")),
        ),
    )  # fmt: skip
