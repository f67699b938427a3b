"""The web app's compare view, tracking lines and Report to, without a browser: real runs of the CLI, read the way the
pages read them (tests/test_ui.py drives the same pages in chromium); a shared compare link through the sign-in gate."""

from __future__ import annotations

import json

from conftest import backprop, inside_app
from reflex.istate.data import RouterData
from starlette.testclient import TestClient
from test_app_state import run, xy

from app.auth import Auth, hash_password, session_secret
from app.gate import AuthGate
from app.state.compare import COLORS, CompareState, compare_view, run_ids
from app.state.multi_run import MultiRunState
from app.state.runs import RunsState, run_view, tracked_in
from app.state.train import TrainState
from training.compare import compare_runs
from training.config import load_settings
from training.runs import Registry

PASSWORD = "correct horse battery"


def train(lr: str, *flags: str) -> dict:
    out = backprop("train", "--model", "demo", "--steps", "3", "--lr", lr, "--validation-split", "0.2", "--eval-every", "2",
                   *flags, "--json", check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_three_runs_are_drawn_one_line_each_on_one_step_axis_with_the_learning_rate_marked_as_differing(home):
    runs = [train(lr) for lr in ("1e-3", "3e-3", "1e-2")]
    ids = [r["run_id"] for r in runs]
    result = compare_runs(Registry(load_settings().home), ids)
    view = compare_view(result)
    page = opened(",".join(ids))  # what /compare?runs=... shows is that view
    assert page.error == "" and page.runs == view["runs"] and page.train == view["train"]
    assert [p.name for p in page.shown_params] == ["learning_rate"]  # only the differing row, until Show all is ticked
    run(CompareState.set_show_all, page, True)
    assert len(page.shown_params) == len(view["params"]) == page.same + 1
    for chart in ("train", "evals", "speed"):
        assert [s.name for s in view[chart].series] == ids  # unnamed runs go by their ids
        assert [s.color for s in view[chart].series] == [f"var(--{c}-9)" for c in COLORS[:3]]
        assert [t.label for t in view[chart].x_ticks][-1] == "3"  # one step axis: 0..3 for all of them
    assert [len(xy(s.points)) for s in view["train"].series] == [3, 3, 3]
    assert all(s.dots.count("h0") == 2 for s in view["evals"].series)  # eval at steps 2 and 3
    lr = next(p for p in view["params"] if p.name == "learning_rate")
    assert lr.differs and lr.cells == ["0.001", "0.003", "0.01"]
    assert view["differing"] == 1 and not any(p.differs for p in view["params"] if p.name != "learning_rate")
    for run_, row, summary in zip(runs, view["runs"], result["runs"], strict=True):
        assert row["id"] == run_["run_id"] and row["status"] == "completed" and row["steps"] == "3/3"
        assert row["final_loss"] == f"{run_['final_loss']:.4f}" and row["eval_loss"] == f"{summary['eval_loss']:.4f}"
        assert row["tokens_per_s"] == f"{summary['tokens_per_s']:.0f}" and row["bwt"] == "-"
    assert not view["has_bwt"]


def test_the_run_page_says_where_a_run_was_tracked(home):
    tracked = train("1e-3", "--report-to", "tensorboard")
    view, _ = run_view(Registry(load_settings().home), tracked["run_id"], None)
    assert view["tracking"] == [f"TensorBoard: {tracked['run_dir']}/tensorboard"]
    untracked = train("1e-3", "--report-to", "none")
    assert run_view(Registry(load_settings().home), untracked["run_id"], None)[0]["tracking"] == []


def test_every_tracker_location_and_failure_has_its_line():
    lines = tracked_in({"tensorboard": "/r/tensorboard", "mlflow": {"run_id": "abc", "tracking_uri": "sqlite:///m.db"},
                        "wandb": {"run_id": "x", "offline_dir": "/r/wandb/offline-run-x"},
                        "failed": {"mlflow": "[DEP_TRACKER_FAILED] unreachable"}})  # fmt: skip
    assert lines == ["TensorBoard: /r/tensorboard", "MLflow: run abc at sqlite:///m.db", "W&B (offline): /r/wandb/offline-run-x",
                     "mlflow: failed ([DEP_TRACKER_FAILED] unreachable)"]  # fmt: skip
    assert tracked_in({"wandb": {"run_id": "x", "url": "https://wandb.ai/me/backprop/runs/x"}}) == [
        "W&B: https://wandb.ai/me/backprop/runs/x"
    ]


def test_ticking_two_to_six_runs_enables_compare_which_opens_an_address_naming_them():
    state = RunsState(_reflex_internal_init=True)
    run(RunsState.toggle, state, "aaa", True)
    assert not state.can_compare
    for run_id in ("bbb", "ccc"):
        run(RunsState.toggle, state, run_id, True)
    run(RunsState.toggle, state, "bbb", False)
    assert state.selected == ["aaa", "ccc"] and state.can_compare
    redirect = run(RunsState.compare, state)
    assert "/compare?runs=aaa,ccc" in str(redirect)
    for run_id in ("d", "e", "f", "g", "h"):
        run(RunsState.toggle, state, run_id, True)
    assert len(state.selected) == 7 and not state.can_compare
    assert run_ids(" aaa, ,ccc,") == ["aaa", "ccc"]


def opened(query: str) -> CompareState:
    """The compare view as /compare?runs=... opens it: its on_load handler, with the address in its router."""
    state = CompareState(_reflex_internal_init=True)
    state.router = RouterData.from_router_data({"pathname": "/compare", "asPath": f"/compare?runs={query}",
                                                "query": {"runs": query}})  # fmt: skip
    run(CompareState.load, state)
    return state


def test_a_compare_address_with_one_run_or_an_unknown_one_shows_the_coded_error_and_no_stale_view(home):
    one = opened("abc")
    assert one.error.startswith("[INPUT_COMPARE_RUN_COUNT]") and " — " in one.error  # code, message — hint
    assert one.runs == [] and one.train.empty
    unknown = opened("nosuchrun1,nosuchrun2")
    assert unknown.error.startswith("[INPUT_RUN_NOT_FOUND]") and "nosuchrun1" in unknown.error


def test_report_to_from_the_train_and_multi_run_forms_reaches_the_settings_and_a_wrong_one_is_refused(home):
    train_form = TrainState(_reflex_internal_init=True)
    run(TrainState.set_report_to, train_form, "tensorboard,nothing")
    run(TrainState.start, train_form)
    assert train_form.error.startswith("[CONFIG_INVALID]") and "unknown tracker nothing" in train_form.error
    assert train_form.run_id == ""
    multi = MultiRunState(_reflex_internal_init=True)
    run(MultiRunState.set_report_to, multi, "wandb, mlflow,nope")
    run(MultiRunState.start, multi)
    assert multi.error.startswith("[CONFIG_INVALID]") and "unknown tracker nope" in multi.error


def test_a_shared_compare_link_leads_back_to_the_same_runs_after_sign_in(tmp_path):
    auth = Auth(True, hash_password(PASSWORD), session_secret(tmp_path), session_hours=1, max_failed_logins=3)
    gate = TestClient(AuthGate(inside_app, auth), base_url="http://127.0.0.1", follow_redirects=False)
    page = gate.get("/compare?runs=aaa,bbb", headers={"accept": "text/html"})  # the gate covers the compare view too
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/compare%3Fruns%3Daaa%2Cbbb"
    assert 'value="/compare?runs=aaa,bbb"' in gate.get(page.headers["location"]).text
    signed_in = gate.post("/api/login", data={"password": PASSWORD, "next": "/compare?runs=aaa,bbb"})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/compare?runs=aaa,bbb"
