"""Backprop's web app: the pages, their routes, and what loads when a page opens."""

from __future__ import annotations

import reflex as rx

from app.gate import protect
from app.pages.chat import chat_page
from app.pages.compare import compare_page
from app.pages.dataset import dataset_page
from app.pages.export import export_page
from app.pages.multi_run import multi_run_page
from app.pages.runs import run_detail_page, runs_page
from app.pages.train import train_page
from app.state.chat import ChatState
from app.state.compare import CompareState
from app.state.dataset import DatasetState
from app.state.export import ExportState
from app.state.multi_run import MultiRunState
from app.state.runs import RunDetailState, RunsState
from app.state.telemetry import sample_forever
from app.state.train import TrainState

# api_transformer: every route (pages, /_event, /_upload, /api/*) behind the one gate of app/gate.py
app = rx.App(head_components=[rx.el.link(rel="icon", href="/favicon.svg", type="image/svg+xml")], api_transformer=protect)
app.add_page(run_detail_page, route="/runs/[run_id]", title="Run · Backprop", on_load=RunDetailState.load)
app.add_page(train_page, route="/", title="Train · Backprop", on_load=TrainState.reattach)
app.add_page(runs_page, route="/runs", title="Runs · Backprop", on_load=RunsState.load)
app.add_page(compare_page, route="/compare", title="Compare · Backprop", on_load=CompareState.load)
app.add_page(export_page, route="/export", title="Export · Backprop", on_load=ExportState.load)
app.add_page(multi_run_page, route="/multi-run", title="Multi-Run · Backprop", on_load=MultiRunState.reattach)
app.add_page(chat_page, route="/chat", title="Chat · Backprop", on_load=ChatState.load)
app.add_page(dataset_page, route="/dataset", title="Dataset · Backprop", on_load=DatasetState.load)
app.register_lifespan_task(sample_forever)
