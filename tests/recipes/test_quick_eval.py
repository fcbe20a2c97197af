"""wlora_trl.evaluation: batched greedy generation and the before/after table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.testing_utils import char_tokenizer, tiny_llama
from wlora_trl.recipes.quick_eval import greedy_generate, results_table, write_results

# A minimal chat template in the char tokenizer's alphabet: "U:<text>\nA:" for a user turn plus generation prompt.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] | upper }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


CONVERSATIONS = [
    [{"role": "user", "content": text}]
    for text in ["7+8=?", "a much longer question here", "hi", "12*3", "what is 5-2?"]
]


def chat_setup():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    model = tiny_llama(seed=3).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def test_batched_generation_matches_one_by_one():
    """Left padding and length sorting must not change what greedy decoding produces, nor its order."""
    model, tokenizer = chat_setup()
    conversations = [[{"role": "user", "content": text}] for text in ["7+8=?", "a much longer question here", "hi"]]
    batched = greedy_generate(model, tokenizer, conversations, max_new_tokens=8, batch_size=3, progress=False)
    single = [
        greedy_generate(model, tokenizer, [c], max_new_tokens=8, batch_size=1, progress=False)[0] for c in conversations
    ]
    assert batched == single
    assert len(set(batched)) > 1  # the prompts lead to different continuations, so the order is really checked
    assert all(len(text) > 0 for text in batched)


def test_generation_restores_training_mode():
    model, tokenizer = chat_setup()
    model.train()
    greedy_generate(model, tokenizer, [[{"role": "user", "content": "x"}]], max_new_tokens=2, progress=False)
    assert model.training


def test_prompt_is_rendered_like_trl():
    """The generation prompt is the chat template with add_generation_prompt=True, i.e. TRL's training prompt."""
    model, tokenizer = chat_setup()
    calls = []
    original = model.generate

    def spy(input_ids, attention_mask, **kwargs):
        calls.append((input_ids, attention_mask))
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.generate = spy
    greedy_generate(model, tokenizer, [[{"role": "user", "content": "2+2"}]], max_new_tokens=1, progress=False)
    ((input_ids, attention_mask),) = calls
    assert input_ids[0].tolist() == tokenizer("U:2+2\nA:", add_special_tokens=False).input_ids
    assert attention_mask.all()


def test_results_table_and_files(tmp_path):
    metrics = (
        {"key": "loss", "label": "held-out loss", "kind": "number"},
        {"key": "em", "label": "exact match", "kind": "fraction"},
    )
    results = {
        "before": {"loss": 1.4277, "em": {"value": 0.0, "count": 0, "total": 16}},
        "after": {"loss": 1.0172, "em": {"value": 0.125, "count": 2, "total": 16}, "extra": float("nan")},
    }
    table = results_table(results, metrics)
    assert table.splitlines() == [
        "| metric | before | after |",
        "|---|---:|---:|",
        "| held-out loss | 1.4277 | 1.0172 |",
        "| exact match | 0/16 = 0.0% | 2/16 = 12.5% |",
    ]
    assert "| metric | after |" in results_table({"before": None, "after": results["after"]}, metrics)
    assert results_table({"after": {}}, metrics) == "(no evaluation was run)"

    json_path, markdown_path = write_results(tmp_path, results, table, "GSM8K check")
    saved = json.loads(open(json_path).read())  # strict JSON: NaN is written as null
    assert saved["after"]["extra"] is None and saved["after"]["loss"] == 1.0172
    assert open(markdown_path).read() == f"# GSM8K check\n\n{table}\n"
    assert saved["before"] == results["before"]


@pytest.mark.slow  # two processes
def test_generation_split_across_processes_gives_every_rank_every_answer_in_order(tmp_path):
    """In a multi-GPU run each rank answers its share and all get all answers (rank 0 alone generating left the
    others waiting in the next collective); two gloo processes must reproduce the one-process answers exactly."""
    model, tokenizer = chat_setup()
    expected = greedy_generate(model, tokenizer, CONVERSATIONS, max_new_tokens=8, batch_size=2, progress=False)
    worker = Path(__file__).parents[1] / "scripts" / "generation_worker.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["answers"] == ranks[1]["answers"] == expected
    assert len(set(expected)) > 1


@pytest.mark.parametrize("fsdp2, resume", [(False, None), (True, None), (True, "checkpoint-2")])
def test_before_evaluation_runs_now_or_as_training_starts_under_fsdp2(tmp_path, monkeypatch, fsdp2, resume, caplog):
    """Without FSDP2 the 'before' evaluation runs at once; under FSDP2 (accelerate shards the model only inside
    train()) it runs from on_train_begin, before the first optimizer step, once; a resumed run skips it."""
    from tests.testing_utils import addition_lm_dataset, cpu_args
    from wlora_trl import WeightLoraConfig, WeightLoraTrainer
    from wlora_trl.recipes import common

    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=2)
    args = cpu_args(tmp_path, max_steps=3, resume_from_checkpoint=resume)
    trainer = WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)
    monkeypatch.setattr(common, "is_fsdp2", lambda _: fsdp2)
    seen_at_steps = []

    def evaluate():
        seen_at_steps.append(trainer.state.global_step)
        return {"probe": 1.0}

    results, timings = {}, {}
    common.evaluate_before_training(trainer, evaluate, results, timings)
    assert seen_at_steps == ([] if fsdp2 else [0])  # under FSDP2 nothing runs before train()
    args.resume_from_checkpoint = None  # the run itself starts fresh here; only the recipe's decision saw `resume`
    trainer.train()
    trainer.train()  # a second train() does not evaluate 'before' again
    if resume:
        assert seen_at_steps == [] and "before" not in results and "skipped" in caplog.text
    else:
        assert seen_at_steps == [0] and results["before"] == {"probe": 1.0} and timings["eval_before"] >= 0
