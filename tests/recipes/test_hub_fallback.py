"""Where the recipes' datasets come from: the local data folder when one is found, else the hub's copy, with one log
line saying which; a folder that was asked for and does not exist, or no folder while the hub is offline, is an error,
never a silent hub download. Both ways with `datasets.load_dataset` mocked: nothing here touches the network."""

from __future__ import annotations

import json
import logging
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest

from wlora_trl.recipes.tasks import boolq, common, glue, gsm8k

REPO = Path(__file__).resolve().parents[2]
LOGGER = common.__name__  # where the loaders log which copy they read


def _gsm8k(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} question {i}?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(n)]


def _boolq(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} q{i}", "passage": f"Title -- passage {i}", "idx": i, "label": i % 2} for i in range(n)]


def _mrpc(n: int, tag: str) -> list[dict]:
    return [{"sentence1": f"{tag} a{i}", "sentence2": f"{tag} b{i}", "label": i % 2, "idx": i} for i in range(n)]


@dataclass
class Case:
    """One loader as the recipes call it without --dataset_name, and the rows it reads."""

    name: str
    load: object  # (**data_kwargs) -> the loader's result
    texts: object  # result -> the texts it holds, in order
    hub: tuple[str, str]  # the hub copy it falls back to: (dataset id, config)
    local: str  # its folder under the data folder
    rows: object  # tag -> {split: rows}


CASES = [
    Case(
        "gsm8k",
        lambda **kw: gsm8k.load_gsm8k("train", **kw),
        lambda result: [example.question for example in result],
        ("openai/gsm8k", "main"),
        "gsm8k",
        lambda tag: {"train": _gsm8k(3, tag)},
    ),
    Case(
        "boolq",
        lambda **kw: boolq.load_boolq(**kw),
        lambda result: [example.question for example in result],
        ("aps/super_glue", "boolq"),
        "boolq",
        lambda tag: {"validation": _boolq(4, tag)},
    ),
    Case(
        "glue mrpc",
        lambda **kw: glue.load_task("mrpc", **kw),
        lambda result: [example.texts[0] for example in result.train + result.eval],
        ("nyu-mll/glue", "mrpc"),
        "glue/mrpc",
        lambda tag: {"train": _mrpc(4, tag), "validation": _mrpc(2, tag + " held-out")},
    ),
    Case(  # one split, cut into train and eval by position
        "glue boolq",
        lambda **kw: glue.load_task("boolq", **kw),
        lambda result: [example.texts[0] for example in result.eval + result.train],
        ("aps/super_glue", "boolq"),
        "boolq",
        lambda tag: {"validation": _boolq(10, tag)},
    ),
]


def _expected_texts(case: Case, rows: dict) -> list[str]:
    first = next(iter(rows.values()))[0]
    column = "question" if "question" in first else "sentence1"
    every = [row[column] for split_rows in rows.values() for row in split_rows]
    if case.name == "glue boolq":  # eval = positions 0, 5, ...; train = the rest
        every = every[::5] + [text for i, text in enumerate(every) if i % 5]
    return every


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The hub reachable (no offline switch), no data folder named, the announcements not yet made."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WLORA_TRL_DATA_DIR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(common, "_ANNOUNCED", set(), raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/data in or above a pytest tmp folder


class FakeHub:
    """`datasets.load_dataset` for hub ids: serves the splits it was given, raises for anything else."""

    def __init__(self):
        self.served: dict[tuple, list[dict]] = {}
        self.calls: list[tuple] = []

    def __call__(self, path, name=None, split=None, **kwargs):
        self.calls.append((path, name, split))
        if (path, name, split) not in self.served:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (the test's hub serves nothing else)")
        return datasets.Dataset.from_list(self.served[(path, name, split)])


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def _lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_without_a_local_folder_the_hub_copy_is_read_and_named(case, online, hub, caplog):
    rows = case.rows("hub")
    for split, split_rows in rows.items():
        hub.served[(*case.hub, split)] = split_rows
    caplog.set_level(logging.INFO, logger=LOGGER)
    result = case.load()
    assert case.texts(result) == _expected_texts(case, rows)
    assert sorted(hub.calls) == sorted((*case.hub, split) for split in rows)
    (line,) = _lines(caplog)
    assert "no local data folder found" in line and f"from the hub: {case.hub[0]} (config {case.hub[1]})" in line


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_local_folder_found_above_is_read_and_the_hub_never_touched(case, online, hub, caplog, tmp_path, monkeypatch):
    rows = case.rows("local")
    data = tmp_path / "checkout" / "shared" / "data"
    for split, split_rows in rows.items():
        path = data / case.local / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
    (tmp_path / "checkout" / "examples").mkdir()
    monkeypatch.chdir(tmp_path / "checkout" / "examples")
    caplog.set_level(logging.INFO, logger=LOGGER)
    result = case.load()
    assert case.texts(result) == _expected_texts(case, rows)
    assert hub.calls == []
    (line,) = _lines(caplog)
    assert f"read from the local data folder {data}" in line


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_named_folder_that_does_not_exist_is_an_error_not_the_hub(case, online, hub, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"--data_dir .*nowhere does not exist"):
        case.load(data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("WLORA_TRL_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"WLORA_TRL_DATA_DIR=.*elsewhere does not exist"):
        case.load()
    assert hub.calls == []


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_no_local_folder_while_the_hub_is_offline_says_where_the_files_go(case, online, hub, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        case.load()
    message = str(info.value)
    assert "no local data folder was found and the hub is offline" in message and "--data_dir" in message
    assert f"<data folder>/{case.local}/" in message and "--dataset_name" in message
    assert hub.calls == []


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_hub_that_cannot_be_read_names_it_and_the_local_alternative(case, online, hub):
    with pytest.raises(OSError) as info:
        case.load()
    message = str(info.value)
    assert f"from the hub failed: ConnectionError: Couldn't reach '{case.hub[0]}'" in message
    assert f"<data folder>/{case.local}/" in message and "--data_dir" in message


def test_train_and_test_from_the_hub_take_one_line(online, hub, caplog):
    for split in ("train", "test"):
        hub.served[("openai/gsm8k", "main", split)] = _gsm8k(2, split)
    caplog.set_level(logging.INFO, logger=LOGGER)
    questions = [example.question for example in gsm8k.load_gsm8k("train") + gsm8k.load_gsm8k("test", limit=1)]
    assert questions == ["train question 0?", "train question 1?", "test question 0?"]
    assert len(_lines(caplog)) == 1


def test_a_glue_task_from_the_hub_names_it_as_its_source(online, hub):
    hub.served[("nyu-mll/glue", "mrpc", "train")] = _mrpc(4, "t")
    hub.served[("nyu-mll/glue", "mrpc", "validation")] = _mrpc(2, "v")
    hub.served[("aps/super_glue", "boolq", "validation")] = _boolq(10, "q")
    assert glue.load_task("mrpc").source == "nyu-mll/glue"
    assert glue.load_task("boolq").source == "aps/super_glue validation, cut by position"


def test_the_minimal_script_reads_the_hub_copy_without_a_local_folder(online, hub, monkeypatch):
    """examples/minimal_sft.py, the script users copy: on a fresh clone (no data folder) its defaults read
    openai/gsm8k; the fake hub refuses it, which stops the script before any model loads."""
    monkeypatch.setattr(sys, "argv", ["minimal_sft.py"])
    with pytest.raises(ConnectionError, match="openai/gsm8k"):
        runpy.run_path(str(REPO / "examples" / "minimal_sft.py"), run_name="__main__")
    assert hub.calls == [("openai/gsm8k", "main", "train")]
