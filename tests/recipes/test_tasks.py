"""Dataset loaders, row checks and answer scoring of wlora_trl.recipes.tasks, on the real local files and on broken copies."""

from __future__ import annotations

import json
import re

import pytest

from wlora_trl._offline.data import resolve_data_dir
from wlora_trl.recipes.tasks import DataFormatError, boolq, gsm8k

DATA_DIR = resolve_data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="no local data folder (shared/data or WLORA_TRL_DATA_DIR)")


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


# --- GSM8K scoring -------------------------------------------------------------------------------------------------


def test_reference_answer():
    assert gsm8k.reference_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k.reference_answer("...\n#### 1,080") == "1080"
    assert gsm8k.reference_answer("...\n#### -3") == "-3"
    assert gsm8k.reference_answer("no final line 42") is None


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("9 * 2 = 18\n#### 18", ("18", True)),
        ("#### 7 ... no wait\n#### 8", ("8", True)),  # the last #### wins
        ("The answer is $1,250.", ("1250", False)),  # no ####: the last number
        ("So she earns 18.00 dollars", ("18", False)),
        ("I do not know.", (None, False)),
        ("#### $2,125", ("2125", True)),
    ],
)
def test_predicted_answer(generation, expected):
    assert gsm8k.predicted_answer(generation) == expected


def test_is_correct():
    assert gsm8k.is_correct("18", "18")
    assert gsm8k.is_correct("18.0", "18")
    assert not gsm8k.is_correct("17", "18")
    assert not gsm8k.is_correct(None, "18")


@needs_data
def test_gsm8k_real_files_load_and_format():
    train = gsm8k.load_gsm8k("train")
    test = gsm8k.load_gsm8k("test", limit=5)
    assert len(train) == 7473 and len(test) == 5
    assert test[0].final == "18" and test[0].question.startswith("Janet")
    # GSM8K's final answers are integers, some written with thousands commas ("1,080"): normalised, all plain.
    assert all(re.fullmatch(r"-?\d+", example.final) for example in train)
    assert any("," in example.answer.rsplit("####", 1)[1] for example in train)
    row = gsm8k.to_prompt_completion(test[0])
    assert row["prompt"] == [{"role": "user", "content": test[0].question}]
    assert row["completion"] == [{"role": "assistant", "content": test[0].answer}]


# --- GSM8K errors: say which file, which line, what to do ----------------------------------------------------------


def test_gsm8k_missing_folder_says_where_to_put_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        gsm8k.load_gsm8k("train", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in message
    assert "grade-school-math" in message and "--dataset_name openai/gsm8k" in message


def test_gsm8k_nonexistent_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_dir .* does not exist"):
        gsm8k.load_gsm8k("train", data_dir=tmp_path / "nowhere")


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"question": "q?", "answer": "no final answer line"}, r"line 2: 'answer' must end with '#### <number>'"),
        ({"question": "q?"}, r"line 2 has no 'answer' field"),
        ({"question": "", "answer": "#### 1"}, r"line 2: 'question' must be a non-empty string"),
        ('{"question": "q?", "answer": ', r"line 2 is not valid JSON"),
        ("[1, 2]", r"line 2 is a JSON list"),
    ],
)
def test_gsm8k_malformed_row_is_located(tmp_path, bad_row, message):
    good = {"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [good, bad_row, good])
    with pytest.raises(DataFormatError, match=message) as info:
        gsm8k.load_gsm8k("train", data_dir=tmp_path)
    assert "train.jsonl" in str(info.value)


def test_gsm8k_rows_beyond_the_limit_are_checked_too(tmp_path):
    good = {"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [good, good, {"question": "q", "answer": "x"}])
    with pytest.raises(DataFormatError, match="line 3"):
        gsm8k.load_gsm8k("test", data_dir=tmp_path, limit=1)


# --- BoolQ -------------------------------------------------------------------------------------------------------


@needs_data
def test_boolq_split_is_deterministic_and_disjoint():
    examples = boolq.load_boolq()
    train, held_out = boolq.train_eval_slices(examples)
    assert (len(examples), len(train), len(held_out)) == (3270, 2616, 654)
    assert held_out[0] == examples[0] and held_out[1] == examples[5] and train[0] == examples[1]
    assert {id(e) for e in train}.isdisjoint({id(e) for e in held_out})
    assert boolq.train_eval_slices(boolq.load_boolq()) == (train, held_out)
    assert 0.55 < sum(e.label for e in held_out) / len(held_out) < 0.67  # BoolQ is ~62% "yes"


@pytest.mark.parametrize(
    "label, ok", [(1, True), (0, True), (True, True), (2, False), ("true", False), (None, False), (1.0, False)]
)
def test_boolq_labels(tmp_path, label, ok):
    write_jsonl(tmp_path / "boolq" / "validation.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": label}])
    if ok:
        assert boolq.load_boolq(data_dir=tmp_path)[0].label == int(label)
    else:
        with pytest.raises(DataFormatError, match=r"validation.jsonl line 1: 'label' must be 0 \(no\) or 1 \(yes\)"):
            boolq.load_boolq(data_dir=tmp_path)


def test_boolq_missing_file(tmp_path):
    (tmp_path / "boolq").mkdir()
    with pytest.raises(FileNotFoundError, match="boolq/validation.jsonl"):
        boolq.load_boolq(data_dir=tmp_path)


def test_score_generations():
    examples = [gsm8k.GSM8KExample("q1", "a\n#### 18", "18"), gsm8k.GSM8KExample("q2", "b\n#### 3", "3")]
    scores = gsm8k.score_generations(examples, ["so 18 eggs\n#### 18", "It is 4 bolts."])
    assert scores["exact_match"] == {"value": 0.5, "count": 1, "total": 2}
    assert scores["answer_format"] == {"value": 0.5, "count": 1, "total": 2}
    assert [r["prediction"] for r in scores["generations"]] == ["18", "4"]
    assert [r["correct"] for r in scores["generations"]] == [True, False]
    with pytest.raises(ValueError, match="one generation per example"):
        gsm8k.score_generations(examples, ["only one"])
