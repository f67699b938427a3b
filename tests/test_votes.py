"""Arena votes (training/votes.py): each vote is one whole preference row in the tuned run's file, whatever happens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from conftest import ROOT

from training.errors import BackpropError
from training.votes import count_votes, read_votes, record_vote, votes_file

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_vote_is_one_conversational_preference_row_in_the_tuned_runs_file(tmp_path):
    path = record_vote(tmp_path, "run-abc", PROMPT, "The capital of France is Paris.", "France France", "tuned", "base")
    assert path == tmp_path / "run-abc.jsonl"
    [row] = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["prompt"] == PROMPT
    assert row["chosen"] == [{"role": "assistant", "content": "The capital of France is Paris."}]
    assert row["rejected"] == [{"role": "assistant", "content": "France France"}]
    assert (row["chosen_by"], row["rejected_by"]) == ("tuned", "base")
    assert row["voted_at"].endswith("+00:00")  # an ISO time, in UTC


def test_votes_append_and_are_counted(tmp_path):
    path = votes_file(tmp_path, "run-abc")
    assert count_votes(path) == 0  # no file yet
    history = [*PROMPT, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan?"}]
    record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    record_vote(tmp_path, "run-abc", history, "Kyoto.", "Tokyo.", "base", "tuned")
    assert count_votes(path) == 2
    assert [r["chosen"][0]["content"] for r in read_votes(path)] == ["Paris.", "Kyoto."]
    assert read_votes(path)[1]["prompt"] == history  # the conversation so far, ending with the question voted on


def test_a_corrected_answer_is_a_vote_for_the_users_text_over_the_tuned_answer(tmp_path):
    path = record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "The capital of France is Lyon.", "user", "tuned")
    row = read_votes(path)[0]
    assert (row["chosen"][0]["content"], row["chosen_by"]) == ("Paris.", "user")
    assert (row["rejected"][0]["content"], row["rejected_by"]) == ("The capital of France is Lyon.", "tuned")


@pytest.mark.parametrize(
    ("prompt", "chosen", "rejected", "reason"),
    [
        (PROMPT, "Paris.", "Paris.", "the same answer"),
        (PROMPT, "Paris.", "  Paris.\n", "the same answer"),  # a tie, up to whitespace
        (PROMPT, "   ", "Paris.", "chosen answer is empty"),
        (PROMPT, "Paris.", "", "rejected answer is empty"),
        ([], "Paris.", "Lyon.", "prompt is empty"),
        ([{"role": "assistant", "content": "Hi"}], "Paris.", "Lyon.", "end with the user's message"),
        ([{"text": "no role"}], "Paris.", "Lyon.", "not {role, content}"),
    ],
)
def test_a_vote_that_is_no_preference_is_refused_with_a_coded_error_and_nothing_is_written(
    tmp_path, prompt, chosen, rejected, reason
):
    record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    before = votes_file(tmp_path, "run-abc").read_bytes()
    with pytest.raises(BackpropError) as error:
        record_vote(tmp_path, "run-abc", prompt, chosen, rejected, "tuned", "base")
    assert error.value.code == "INPUT_DATASET_BAD_PAIR"
    assert reason in error.value.message and "run-abc.jsonl:2:" in error.value.message  # the line it would have been
    assert votes_file(tmp_path, "run-abc").read_bytes() == before


def test_the_source_becomes_a_safe_file_name_inside_the_folder(tmp_path):
    path = record_vote(tmp_path / "preferences", "../../etc/passwd", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    assert path.parent == tmp_path / "preferences" and path.name == "passwd.jsonl"
    assert votes_file(tmp_path, "runs/My run (v2)").name == "My_run_v2.jsonl"


# A long answer makes each row far bigger than one pipe-sized write: rows written without the lock would interleave.
LONG = "word " * 8000

WRITER = """
import sys
from pathlib import Path
from training.votes import record_vote
folder, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    record_vote(folder, "run-abc", [{"role": "user", "content": f"{who} question {i}"}], f"{who} good {i} " + sys.argv[4],
                "bad " + sys.argv[4], who, "base")
"""


def test_votes_from_many_threads_and_processes_at_once_all_land_whole(tmp_path):
    n = 15
    processes = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"process{p}", str(n), LONG], cwd=ROOT) for p in range(3)
    ]

    def vote(who: str) -> None:
        for i in range(n):
            record_vote(tmp_path, "run-abc", [{"role": "user", "content": f"{who} question {i}"}], f"{who} good {i} " + LONG,
                        "bad " + LONG, who, "base")  # fmt: skip

    threads = [threading.Thread(target=vote, args=(f"thread{t}",)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.wait(timeout=120) == 0 for p in processes)

    path = votes_file(tmp_path, "run-abc")
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line is a whole row
    assert len(rows) == count_votes(path) == 6 * n
    for who in [f"thread{t}" for t in range(3)] + [f"process{p}" for p in range(3)]:
        mine = [r for r in rows if r["chosen_by"] == who]
        assert [r["prompt"][0]["content"] for r in mine] == [f"{who} question {i}" for i in range(n)]  # each writer's order
        assert all(r["chosen"][0]["content"] == f"{who} good {i} " + LONG for i, r in enumerate(mine))


def test_a_half_written_last_row_left_by_a_crash_is_cut_off_by_the_next_vote(tmp_path):
    path = record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    whole = path.read_bytes()
    second = json.dumps({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Par"}]})
    path.write_bytes(whole + second.encode()[:40])  # the process died in the middle of writing its row
    assert count_votes(path) == 1  # the torn row is not counted
    record_vote(tmp_path, "run-abc", PROMPT, "It is Paris.", "Lyon.", "user", "tuned")
    assert path.read_bytes().startswith(whole)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["chosen"][0]["content"] for r in rows] == ["Paris.", "It is Paris."]


def test_a_file_holding_only_a_torn_row_starts_over(tmp_path):
    path = votes_file(tmp_path, "run-abc")
    path.write_bytes(b'{"prompt": [{"role": "us')
    record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    assert count_votes(path) == 1 and len(read_votes(path)) == 1


def test_a_torn_row_longer_than_one_read_is_cut_off_whole(tmp_path):
    path = record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"prompt": "' + b"x" * 10_000)  # more than the 4 KiB read backwards at a time
    record_vote(tmp_path, "run-abc", PROMPT, "Rome.", "Lyon.", "tuned", "base")
    assert [r["chosen"][0]["content"] for r in read_votes(path)] == ["Paris.", "Rome."]


def test_training_on_votes_makes_three_passes_over_them_whatever_the_models_preset_step_count():
    from training.config import load_settings, nest_options
    from training.models import apply_model_defaults
    from training.votes import dpo_options

    assert dpo_options() == {"method": "dpo", "epochs": 3}
    for model in ("demo", "Qwen/Qwen2.5-0.5B-Instruct"):
        training = apply_model_defaults(load_settings(**nest_options({"model": model, **dpo_options()}))).training
        assert (training.method, training.epochs, training.steps) == ("dpo", 3, None), model  # the demo's 300 steps do not win


def test_the_votes_file_loads_as_preference_pairs(tmp_path):
    from training import datasets

    record_vote(tmp_path, "run-abc", PROMPT, "Paris.", "Lyon.", "tuned", "base")
    history = [*PROMPT, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan?"}]
    path = record_vote(tmp_path, "run-abc", history, "Tokyo.", "Kyoto.", "user", "tuned")
    examples = datasets.load_dataset(path).examples
    assert [e.is_preference for e in examples] == [True, True]
    assert examples[1].prompt == history
    assert examples[1].chosen == [{"role": "assistant", "content": "Tokyo."}]
    assert examples[1].rejected == [{"role": "assistant", "content": "Kyoto."}]


# --- the Chat page's votes, without a browser (tests/test_ui.py has the whole path) -----------------------------------


@pytest.fixture
def chat(home, tmp_path, monkeypatch):
    from app import folders
    from app.state.chat import ChatState, turn

    monkeypatch.setenv("BACKPROPAGATE_UI__OUTPUT_DIR", str(tmp_path / "sandbox"))
    folders.root.cache_clear()
    state = ChatState(_reflex_internal_init=True)
    state.messages = [
        turn("user", "What is the capital of France?"),
        turn("assistant", "Paris.", base="France is a country.", run="run-abc", done="1"),
        turn("user", "And of Japan?"),
        turn("assistant", "Tokyo.", base="Tokyo.", run="run-abc", done="1", same="1"),
        turn("user", "And of Italy?"),
        turn("assistant", "Rome.", base="Milan.", run="", done="1"),  # answered by a GGUF or a typed folder
    ]
    yield state
    folders.root.cache_clear()


def test_the_chat_page_stores_a_vote_on_a_finished_pair_in_the_sandbox(chat, tmp_path):
    from app.state.chat import ChatState

    ChatState.vote.fn(chat, 1, "base")
    assert chat.vote_error == "" and chat.messages[1]["vote"] == "base"
    [row] = read_votes(tmp_path / "sandbox" / "preferences" / "run-abc.jsonl")
    assert row["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == ("France is a country.", "Paris.")
    assert (row["chosen_by"], row["rejected_by"]) == ("base", "tuned")


def test_a_better_answer_written_on_the_chat_page_is_chosen_over_the_tuned_one(chat, tmp_path):
    from app.state.chat import ChatState

    ChatState.write_better.fn(chat, 3)  # a tie between the models, but the user knows better
    ChatState.edit_correction.fn(chat, "  The capital of Japan is Tokyo.  ")
    ChatState.save_correction.fn(chat)
    assert chat.vote_error == "" and chat.messages[3]["vote"] == "user" and chat.correcting == -1
    [row] = read_votes(tmp_path / "sandbox" / "preferences" / "run-abc.jsonl")
    assert row["chosen"][0]["content"] == "The capital of Japan is Tokyo." and row["rejected"][0]["content"] == "Tokyo."
    assert row["prompt"][-1] == {"role": "user", "content": "And of Japan?"} and len(row["prompt"]) == 3


@pytest.mark.parametrize(
    ("index", "winner", "code"),
    [
        (3, "tuned", "INPUT_DATASET_BAD_PAIR"),  # both models gave the same answer
        (5, "tuned", "UI_EVENT_REFUSED"),  # no run's adapter answered: nothing to train from
        (0, "tuned", "UI_EVENT_REFUSED"),  # the user's message
        (9, "tuned", "UI_EVENT_REFUSED"),
        ("1", "tuned", "UI_EVENT_REFUSED"),  # a tampered page's index
        (1, "user", "UI_EVENT_REFUSED"),
    ],
)
def test_a_vote_the_chat_page_cannot_take_shows_its_code_and_writes_nothing(chat, tmp_path, index, winner, code):
    from app.state.chat import ChatState

    ChatState.vote.fn(chat, index, winner)
    assert chat.vote_error.startswith(f"[{code}]")
    assert not (tmp_path / "sandbox" / "preferences" / "run-abc.jsonl").exists()


def test_a_pair_is_voted_on_once(chat):
    from app.state.chat import ChatState

    ChatState.vote.fn(chat, 1, "tuned")
    ChatState.vote.fn(chat, 1, "base")
    assert chat.vote_error.startswith("[UI_EVENT_REFUSED]") and chat.messages[1]["vote"] == "tuned"


def test_training_on_votes_needs_two_of_them(chat):
    from app.state.chat import ChatState

    chat._targets, chat.source = {"run-abc · adapter": ["run-abc", "run-abc"]}, "run-abc · adapter"
    ChatState.vote.fn(chat, 1, "tuned")
    assert (chat.vote_run, chat.votes) == ("run-abc", 1)  # the count the page shows
    ChatState.train_on_votes.fn(chat)
    assert chat.vote_error.startswith("[INPUT_INVALID_ARGUMENT] 1 vote so far: at least 2 are needed")
    assert chat.training is False
