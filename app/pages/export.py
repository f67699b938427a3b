"""Export: source run, format, quantization with size estimates, Ollama, hub; progress; result and verification."""

from __future__ import annotations

import reflex as rx

from app.components.layout import page
from app.state.export import ExportState

QUANTIZATIONS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "f32"]


def labelled(label: str, control: rx.Component) -> rx.Component:
    return rx.vstack(rx.text(label, size="1", weight="medium"), control, spacing="1")


def export_page() -> rx.Component:
    return page(
        "Export",
        rx.cond(ExportState.runs.length() == 0, rx.text(
            "No completed run yet: train one on the Train page, or type the folder of an adapter or a model below.",
            color_scheme="gray")),
        rx.card(
            rx.vstack(
                rx.hstack(
                    rx.cond(ExportState.runs.length() > 0, labelled("Run", rx.select(
                        ExportState.runs, value=ExportState.source, on_change=ExportState.set_source, id="export-run"))),
                    labelled("or a folder (adapter, model or run folder)", rx.input(
                        value=ExportState.folder, on_change=ExportState.set_folder,
                        placeholder="/path/to/adapter", width="260px", id="export-folder")),
                    labelled("Format", rx.select(["lora", "merged", "gguf"], value=ExportState.format,
                                                 on_change=ExportState.set_format, id="export-format")),
                    rx.cond(ExportState.format == "gguf", labelled("Quantization", rx.select(
                        QUANTIZATIONS, value=ExportState.quantization,
                        on_change=ExportState.set_quantization, id="export-quantization"))),
                    wrap="wrap",
                ),
                rx.cond(ExportState.format == "gguf", rx.vstack(
                    rx.text("Estimated GGUF sizes: ", rx.foreach(ExportState.estimates, lambda e: rx.text.span(e, " · ")),
                            size="1", color_scheme="gray"),
                    rx.hstack(
                        labelled("Ollama model name (optional)", rx.input(
                            value=ExportState.ollama_name, on_change=ExportState.set_ollama_name,
                            id="export-ollama-name")),
                        rx.checkbox("Register with Ollama", checked=ExportState.register,
                                    on_change=ExportState.set_register, id="export-register"),
                        align="end",
                    ),
                )),
                rx.button("Export", on_click=ExportState.start, loading=ExportState.busy, id="export-start"),
                rx.cond(ExportState.busy, rx.hstack(rx.spinner(), rx.text(ExportState.stage, id="export-stage"))),
                rx.cond(ExportState.error != "", rx.callout(ExportState.error, color_scheme="red", id="export-error")),
                rx.cond(ExportState.result.contains("path"), rx.card(rx.vstack(
                    rx.text("Written: ", rx.code(ExportState.result["path"]), " ", ExportState.result["size"]),
                    rx.text("llama.cpp verification: ", ExportState.result["verification"]),
                    rx.cond(ExportState.result["ollama"] != "", rx.text("Ollama: ", ExportState.result["ollama"])),
                ), id="export-result")),
                rx.divider(),
                rx.text("Share on the Hugging Face Hub: the adapter (or the merged model, if Format is merged). Needs a "
                        "write token in HF_TOKEN where `backprop ui` runs.", size="1", color_scheme="gray"),
                rx.hstack(
                    labelled("Hugging Face repo (owner/name)", rx.input(
                        value=ExportState.hub_repo, on_change=ExportState.set_hub_repo,
                        id="export-hub-repo")),
                    rx.checkbox("Private", checked=ExportState.private,
                                on_change=ExportState.set_private),
                    rx.button("Push to the hub", on_click=ExportState.push_to_hub, variant="soft", disabled=ExportState.busy,
                              id="export-push"),
                    align="end", wrap="wrap",
                ),
                rx.cond(ExportState.hub_error != "",
                        rx.callout(ExportState.hub_error, color_scheme="red", id="export-hub-error")),
                width="100%",
            ),
            width="100%",
        ),
    )  # fmt: skip
