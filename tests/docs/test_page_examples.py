"""The `python` examples of the quickstart and trainers pages, run as the pages show them on tiny models.

Each marked example (`<!-- example: NAME -->` above the fence) is taken from the Markdown file at test time, so a
changed page runs its new code. Only what a CPU test cannot have is substituted: the hub model id becomes a tiny
model saved to a folder, a hub dataset an in-memory one, and 1000 steps a few. Every substitution must find its text
exactly once, so an example that no longer says what the test replaces fails here instead of running something else.
The saved adapters are reloaded with stock PEFT in a process that never imports wlora_trl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.docs.pages import examples
from tests.testing_utils import char_tokenizer, tiny_bert_classifier, tiny_llama

HUB_LM = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
HUB_ENCODER = '"sentence-transformers/all-MiniLM-L6-v2"'
PROBE = torch.arange(3, 35).reshape(2, 16)

# Every marked example of these pages has a runner below; a new example fails test_every_example_has_a_runner.
RUNNERS = {
    "quickstart": ["sft-script", "stock-reload"],
    "trainers": ["classifier", "mixin", "custom-loop", "fsdp2-loop"],
}


def substitute(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        count = code.count(old)
        assert count == 1, f"the example should contain {old!r} once (found {count}); update this test's runner"
        code = code.replace(old, new)
    return code


def run_example(code: str, directory: Path, **names) -> dict:
    """Execute an example as a script run from `directory` (its relative `outputs/...` land there)."""
    namespace = {"__name__": "__main__", **names}
    previous = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(code, "<docs example>", "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


STOCK_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    import peft, transformers
    jobs = json.loads(sys.argv[1])
    probe = torch.load(sys.argv[2])
    for job in jobs:
        base = getattr(transformers, job["auto"]).from_pretrained(job["base"]).eval()
        with torch.no_grad():
            torch.save(base(input_ids=probe).logits, job["out"] + ".base")
        if job.get("code"):  # the page's own loading code, run here, where wlora_trl is not importable
            namespace = {}
            exec(job["code"], namespace)
            model = namespace["model"].eval()
        else:
            model = peft.PeftModel.from_pretrained(base, job["adapter"]).eval()
        with torch.no_grad():
            torch.save(model(input_ids=probe).logits, job["out"])
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


def stock_reload(jobs: list[dict], tmp_path: Path, cwd: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reloaded logits, base logits) per job, from one process that has no wlora_trl to import."""
    torch.save(PROBE, tmp_path / "probe.pt")
    for i, job in enumerate(jobs):
        job["out"] = str(tmp_path / f"reload{i}.pt")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", STOCK_RELOAD, json.dumps(jobs), str(tmp_path / "probe.pt")]
    subprocess.run(command, check=True, cwd=cwd, env=env, timeout=600)
    return [(torch.load(job["out"]), torch.load(job["out"] + ".base")) for job in jobs]


def assert_reload_is_the_trained_model(reloaded, base, trained) -> None:
    effect = (trained - base).abs().max().item()
    assert effect > 1e-3, f"the adapter barely changes the logits ({effect}): nothing to check the reload against"
    assert (reloaded - trained).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for the pages' hub models, saved with their tokenizer as the hub ids would give them."""
    root = tmp_path_factory.mktemp("models")
    folders = {"lm": root / "tiny-llama", "encoder": root / "tiny-bert"}
    tiny_llama().save_pretrained(folders["lm"])
    tiny_bert_classifier().save_pretrained(folders["encoder"])
    for folder in folders.values():
        char_tokenizer().save_pretrained(folder)
    return folders


def test_every_example_has_a_runner():
    for name, runners in RUNNERS.items():
        assert list(examples(name)) == runners, f"docs/source/{name}.md's examples changed: give each a runner here"


def quickstart_script(models: dict[str, Path], directory: Path) -> dict:
    from datasets import Dataset

    pairs = [(a, b) for a in range(9) for b in range(9)]
    rows = {"question": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    code = substitute(
        examples("quickstart")["sft-script"],
        {
            'load_dataset("openai/gsm8k", "main", split="train")': "Dataset.from_dict(ROWS)",
            HUB_LM: repr(str(models["lm"])),
            # fp32 (bf16=False), so the reload is compared with the trained model to fp32 precision
            "max_steps=1000": "max_steps=8, use_cpu=True, bf16=False, per_device_train_batch_size=8, "
            "learning_rate=5e-3, report_to=[], disable_tqdm=True",
        },
    )
    trainer = run_example(code, directory, Dataset=Dataset, ROWS=rows)["trainer"]
    # The page's own stock-PEFT loading example is what reloads it, as it stands.
    job = {"auto": "AutoModelForCausalLM", "base": str(models["lm"]), "code": examples("quickstart")["stock-reload"]}
    return {"trainer": trainer, "trained": logits(trainer.model), "job": job, "dir": directory}


def classifier(models: dict[str, Path], directory: Path) -> dict:
    code = substitute(
        examples("trainers")["classifier"],
        {
            HUB_ENCODER: repr(str(models["encoder"])),
            "max_steps=1000": "max_steps=8, learning_rate=5e-3, use_cpu=True, report_to=[]",
        },
    )
    trainer = run_example(code, directory)["trainer"]
    adapter = directory / "outputs" / "classifier"
    job = {"auto": "AutoModelForSequenceClassification", "base": str(models["encoder"]), "adapter": str(adapter)}
    return {"trainer": trainer, "trained": logits(trainer.model), "job": job, "dir": directory}


def custom_loop(models: dict[str, Path], directory: Path) -> dict:
    code = substitute(
        examples("trainers")["custom-loop"], {HUB_LM: repr(str(models["lm"])), "max_steps = 1000": "max_steps = 12"}
    )
    done = run_example(code, directory)
    adapter = directory / "outputs" / "custom-loop"
    job = {"auto": "AutoModelForCausalLM", "base": str(models["lm"]), "adapter": str(adapter)}
    return {"weight_lora": done["weight_lora"], "trained": logits(done["model"]), "job": job, "dir": directory}


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, dict]:
    """The one-process examples, each run in its own folder, then every saved adapter reloaded by stock PEFT in one
    process (a Python start-up, not three). A failed example is kept as its exception, for its own test to raise."""
    runs: dict[str, dict | Exception] = {}
    for name, run in {"sft-script": quickstart_script, "classifier": classifier, "custom-loop": custom_loop}.items():
        try:
            runs[name] = run(models, tmp_path_factory.mktemp(name))
        except Exception as error:  # re-raised by the example's own test
            runs[name] = error
    done = [run for run in runs.values() if isinstance(run, dict)]
    if done:
        # From the quickstart's folder when it ran: its loading example names the adapter by a relative path.
        cwd = done[0]["dir"]
        reloads = stock_reload([run["job"] for run in done], tmp_path_factory.mktemp("reload"), cwd=cwd)
        for run, (reloaded, base) in zip(done, reloads):
            run["reloaded"], run["base"] = reloaded, base
    return runs


def result(trained: dict, name: str) -> dict:
    run = trained[name]
    if isinstance(run, Exception):
        raise run
    return run


def test_quickstart_script_trains_through_the_switch_and_reloads_with_stock_peft(trained):
    run = result(trained, "sft-script")
    trainer = run["trainer"]
    assert trainer.weight_lora.switched and trainer.state.global_step == 8
    selection = json.loads((run["dir"] / "outputs" / "weightlora" / "selection.json").read_text())
    assert sum(a["kept"] for a in selection["adapters"]) == selection["k"] == 7  # K = n/2 of the tiny Llama's 14
    assert_reload_is_the_trained_model(run["reloaded"], run["base"], run["trained"])


def test_classifier_example_keeps_its_head_in_the_adapter(trained):
    run = result(trained, "classifier")
    assert run["trainer"].weight_lora.switched
    config = json.loads((run["dir"] / "outputs" / "classifier" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and len(config["target_modules"]) == 2  # K = 4 / 2
    assert_reload_is_the_trained_model(run["reloaded"], run["base"], run["trained"])


def test_mixin_example_gives_a_trl_dpo_trainer_weightlora(models, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from wlora_trl import WeightLoraConfig, WeightLoraMixin

    cls = run_example(examples("trainers")["mixin"], tmp_path)["WeightLoraDPOTrainer"]
    assert cls.__mro__[1:3] == (WeightLoraMixin, DPOTrainer)
    pairs = [(a, b) for a in range(8) for b in range(8)]
    rows = {
        "prompt": [f"{a}+{b}=" for a, b in pairs],
        "chosen": [str(a + b) for a, b in pairs],
        "rejected": [str(a * b + 1) for a, b in pairs],
    }
    args = DPOConfig(
        str(tmp_path / "dpo"), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3, use_cpu=True,
        bf16=False, gradient_checkpointing=False, report_to=[], disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = cls(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=char_tokenizer(),
        peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3),
    )
    trainer.train()
    assert trainer.weight_lora.switched and len(trainer.weight_lora.report().kept_modules) == 7
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert optimized == trainable  # the optimizer was edited at the switch: only the kept adapters train


def test_custom_loop_example_switches_and_saves_a_stock_adapter(trained):
    run = result(trained, "custom-loop")
    weight_lora = run["weight_lora"]
    assert weight_lora.switched and weight_lora.selection_steps == 5  # T's floor: 0.5% of 12 steps is below it
    assert_reload_is_the_trained_model(run["reloaded"], run["base"], run["trained"])


@pytest.mark.slow  # two processes
def test_fsdp2_loop_example_runs_sharded_on_two_processes(models, tmp_path):
    probe = tmp_path / "probe.pt"
    torch.save(PROBE, probe)
    # After the page's loop, every rank runs the sharded model on a probe (FSDP2's forward is collective) and rank 0
    # keeps the logits, to check the saved adapter against.
    record = (
        "with torch.no_grad():\n"
        f"    sharded_logits = model(input_ids=torch.load({str(probe)!r})).logits\n"
        "if dist.get_rank() == 0:\n"
        f"    torch.save(sharded_logits.full_tensor() if hasattr(sharded_logits, 'full_tensor') else sharded_logits, "
        f"{str(tmp_path / 'sharded.pt')!r})\n"
        f"    torch.save(weight_lora.switched, {str(tmp_path / 'switched.pt')!r})\n"
        "dist.destroy_process_group()"
    )
    code = substitute(
        examples("trainers")["fsdp2-loop"],
        {
            HUB_LM: repr(str(models["lm"])),
            "max_steps = 1000": "max_steps = 10",
            "dist.destroy_process_group()": record,
        },
    )
    script = tmp_path / "loop.py"
    script.write_text(code)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert torch.load(tmp_path / "switched.pt")
    job = {"auto": "AutoModelForCausalLM", "base": str(models["lm"]), "adapter": str(tmp_path / "outputs/fsdp2-loop")}
    ((reloaded, base),) = stock_reload([job], tmp_path, cwd=tmp_path)
    assert_reload_is_the_trained_model(reloaded, base, torch.load(tmp_path / "sharded.pt"))
