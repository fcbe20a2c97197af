"""`wlora-trl eval` end to end on a tiny Llama, its refusals, and the `sft` / `config-path` command lines.

The tiny model (2 layers, hidden 64) carries the real SmolLM2 tokenizer, so lm-eval tokenizes real prompts; the
tokenizer comes from the cached SmolLM2 conversion (~30 s once per cache, then instant).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wlora_trl._offline.data import resolve_data_dir
from wlora_trl.cli import main
from wlora_trl.cli.launch import packaged_accelerate_configs, sft_launch_argv
from wlora_trl.evaluation import command as eval_command_module
from wlora_trl.evaluation.adapters import AdapterInputError, check_adapter
from wlora_trl.evaluation.base_model import inspect_base_model
from wlora_trl.evaluation.runner import RunSettings, make_lm

pytestmark = pytest.mark.slow  # lm-evaluation-harness end to end, and the real SmolLM2 tokenizer

ALL_TASKS = ["gsm8k", "hellaswag", "boolq", "arc_challenge"]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    # Nothing may come from the hub: a silent download would hide a broken local task.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="module")
def data_dir() -> Path:
    found = resolve_data_dir()
    assert found is not None, "the eval tests need the local data folder: run from a checkout with shared/data above"
    return found


def _tiny_llama(vocab_size: int, tokenizer=None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    return LlamaForCausalLM(config)


def _save_lora(model, out: Path, target_modules=("q_proj", "v_proj"), seed: int = 1) -> Path:
    """A stock PEFT LoRA adapter whose lora_B is random, so the adapted model differs from the base."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base folder, adapter folder) of a tiny random Llama with the SmolLM2 tokenizer and a LoRA adapter for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wlora_trl._offline.models import smollm2_path

    root = tmp_path_factory.mktemp("tiny_eval")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    base = root / "base"
    _tiny_llama(len(tokenizer), tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = _save_lora(AutoModelForCausalLM.from_pretrained(base), root / "adapter")
    return base, adapter


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as evaluating (loading) a model."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded although the input should have been refused")

    monkeypatch.setattr(eval_command_module, "evaluate_model", forbidden)


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- end to end


def test_all_four_tasks_base_and_adapter_end_to_end(tiny, data_dir, tmp_path, capsys):
    base, adapter = tiny
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(base),
        "--adapter",
        str(adapter),
        "--tasks",
        ",".join(ALL_TASKS),
        "--limit",
        "2",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    payload = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in payload["models"]] == ["base", "adapter"]
    assert payload["settings"]["data"] == str(data_dir.resolve())
    for task in ALL_TASKS:
        assert payload["n_samples"][task]["effective"] == 2
        for label in ("base", "adapter"):
            metrics = payload["results"][label][task]
            assert metrics, f"no metric for {task} / {label}"
            assert all(math.isfinite(m["value"]) and 0 <= m["value"] <= 1 for m in metrics.values())
    expected_metrics = {
        ("gsm8k", "exact_match (strict-match)"),
        ("gsm8k", "exact_match (flexible-extract)"),
        ("hellaswag", "acc"),
        ("hellaswag", "acc_norm"),
        ("boolq", "acc"),
        ("arc_challenge", "acc"),
        ("arc_challenge", "acc_norm"),
    }
    assert {(row["task"], row["metric"]) for row in payload["table"]} == expected_metrics
    for row in payload["table"]:
        assert row["delta adapter"] == pytest.approx(row["adapter"] - row["base"])
        # The printed table and the Markdown hold the same rows, with finite numbers.
        cells = next(
            c
            for line in printed.splitlines()
            if (c := re.split(r"\s{2,}", line.strip()))[:2] == [row["task"], row["metric"]]
        )
        assert cells[2:] == ["2", f"{row['base']:.4f}", f"{row['adapter']:.4f}", f"{row['delta adapter']:+.4f}"]
    markdown = (out / "results.md").read_text()
    assert "| task | metric | n | base | adapter | delta adapter |" in markdown
    assert markdown.count("\n| ") == len(expected_metrics) + 1


@pytest.mark.parametrize("task", ALL_TASKS)
def test_task_files_change_only_the_data_source(task, data_dir, tmp_path):
    """Local: lm-eval's stock config with only the data keys replaced. Online: the stock config itself."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from wlora_trl.evaluation.tasks import write_task_folder

    local = load_yaml(write_task_folder([task], data_dir, tmp_path / "local") / f"{task}.yaml", resolve_func=False)
    online = load_yaml(write_task_folder([task], None, tmp_path / "online") / f"{task}.yaml", resolve_func=False)
    stock = load_yaml(_stock_path(task), resolve_func=False)
    assert online == stock
    changed = {key for key in stock.keys() | local.keys() if stock.get(key) != local.get(key)}
    assert changed <= {"dataset_path", "dataset_name", "dataset_kwargs", "training_split"}
    assert local["dataset_path"] == "json"
    for path in local["dataset_kwargs"]["data_files"].values():
        assert Path(path).is_absolute() and Path(path).is_file()


def _stock_path(task: str) -> Path:
    import lm_eval.tasks

    stock = {
        "gsm8k": "gsm8k/gsm8k.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "boolq": "super_glue/boolq/default.yaml",
        "arc_challenge": "arc/arc_challenge.yaml",
    }[task]
    return Path(lm_eval.tasks.__file__).parent / stock


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_adapter_is_applied_and_8bit_quantizes(tiny):
    """What lm-eval evaluates: the base from its folder, the adapter on top (unmerged), and 8-bit Linear layers."""
    import bitsandbytes as bnb
    from peft import PeftModel

    base, adapter = tiny
    settings = RunSettings(
        model_path=str(base),
        dtype="float32",
        load_in_8bit=False,
        device="cpu",
        batch_size=1,
        limit=None,
        num_fewshot=None,
    )
    ids = torch.arange(10, 30).reshape(1, 20)
    plain, adapted = make_lm(settings, None), make_lm(settings, str(adapter))
    assert not isinstance(plain.model, PeftModel) and isinstance(adapted.model, PeftModel)
    assert (_logits(plain, ids) - _logits(adapted, ids)).abs().max() > 1e-3

    quantized = make_lm(RunSettings(**{**settings.__dict__, "load_in_8bit": True}), str(adapter))
    linear_types = {
        type(m) for m in quantized.model.base_model.model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    }
    assert bnb.nn.Linear8bitLt in linear_types
    assert torch.isfinite(_logits(quantized, ids)).all()


# --------------------------------------------------------------------------- refusals, before any model loads


def test_unknown_task_is_refused_with_the_valid_ones(capsys, no_model_load):
    err = _refused(capsys, ["eval", "--tasks", "gsm8k,mmlu"])
    assert "unknown task(s) mmlu" in err
    assert all(task in err for task in ALL_TASKS)


def test_folder_without_adapter_config_is_refused(tiny, data_dir, tmp_path, capsys, no_model_load):
    base, _ = tiny
    not_adapter = tmp_path / "not_an_adapter"
    not_adapter.mkdir()
    (not_adapter / "adapter_model.safetensors").write_bytes(b"")
    err = _refused(
        capsys,
        ["eval", "--model", str(base), "--adapter", str(not_adapter), "--tasks", "boolq", "--data_dir", str(data_dir)],
    )
    assert "not a PEFT adapter" in err and "adapter_config.json" in err


def test_adapter_of_another_peft_type_is_refused(tiny, data_dir, tmp_path, capsys, no_model_load):
    base, adapter = tiny
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    err = _refused(
        capsys, ["eval", "--model", str(base), "--adapter", str(ia3), "--tasks", "boolq", "--data_dir", str(data_dir)]
    )
    assert "'IA3' adapter, not LoRA" in err


def test_adapter_of_another_architecture_is_refused(tiny, data_dir, tmp_path, capsys, no_model_load):
    """GPT-2 names its attention c_attn: none of the adapter's modules exist in a Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base, _ = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64))
    gpt2_adapter = _save_lora(gpt2, tmp_path / "gpt2_adapter", target_modules=("c_attn",))
    err = _refused(
        capsys,
        ["eval", "--model", str(base), "--adapter", str(gpt2_adapter), "--tasks", "boolq", "--data_dir", str(data_dir)],
    )
    assert "is not an adapter for" in err
    assert "none of its target_modules ['c_attn'] exists" in err and "q_proj" in err


def test_adapter_of_a_differently_sized_base_is_refused(tiny, tmp_path):
    """Same architecture and module names, other hidden size: the saved LoRA shapes do not fit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, _ = tiny
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    wide_adapter = _save_lora(wide, tmp_path / "wide_adapter")
    with pytest.raises(AdapterInputError, match=r"q_proj\.lora_A\.weight has shape \[4, 32\], which does not fit"):
        check_adapter(wide_adapter, inspect_base_model(str(base)))


def test_recorded_base_is_compared_where_it_can_be_read(tiny, tmp_path):
    """Shapes fit (same hidden size) but the recorded base folder is another model: refused; an unreadable hub
    id only warns, since the modules and shapes fit."""
    from transformers import AutoModelForCausalLM

    base, _ = tiny
    other_base = tmp_path / "other_base"
    _tiny_llama(vocab_size=1000).save_pretrained(other_base)
    other_adapter = _save_lora(AutoModelForCausalLM.from_pretrained(other_base), tmp_path / "other_adapter")
    info = inspect_base_model(str(base))
    with pytest.raises(AdapterInputError, match=r"trained on .*other_base.*vocab_size 1000 vs 49152"):
        check_adapter(other_adapter, info)

    config_file = other_adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "someone/x"}))
    assert "records base model 'someone/x'" in check_adapter(other_adapter, info).warnings[0]


def test_missing_data_files_say_where_to_put_them(tiny, tmp_path, capsys, no_model_load):
    base, _ = tiny
    partial = tmp_path / "data"
    (partial / "gsm8k").mkdir(parents=True)
    (partial / "gsm8k" / "train.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n' * 3)
    err = _refused(capsys, ["eval", "--model", str(base), "--tasks", "gsm8k,boolq", "--data_dir", str(partial)])
    assert (
        f"{partial / 'gsm8k' / 'test.jsonl'} is missing; put the test split of the hub dataset openai/gsm8k/main" in err
    )
    assert f"{partial / 'boolq' / 'validation.jsonl'} is missing" in err
    assert "5-shot needs 6 rows" in err  # 3 train rows cannot give gsm8k its 5 examples


def test_no_local_data_while_offline_is_refused(tiny, tmp_path, monkeypatch, capsys, no_model_load):
    base, _ = tiny
    monkeypatch.delenv("WLORA_TRL_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/data in or above a pytest tmp folder
    err = _refused(capsys, ["eval", "--model", str(base), "--tasks", "boolq"])
    assert "no local data folder was found and the hub is offline" in err and "--data_dir" in err


def test_non_positive_limit_is_refused(capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--limit", "0"])
    assert exit_info.value.code == 2 and "--limit must be positive" in capsys.readouterr().err


def test_unreadable_model_is_refused(tmp_path, data_dir, capsys, no_model_load):
    err = _refused(
        capsys, ["eval", "--model", str(tmp_path / "nowhere"), "--tasks", "boolq", "--data_dir", str(data_dir)]
    )
    assert "cannot read its config" in err


# --------------------------------------------------------------------------- command line, sft, accelerate


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("eval", "sft", "config-path"))


def test_module_entry_point_prints_packaged_config():
    """`python -m wlora_trl.cli` is what `accelerate launch -m wlora_trl.cli eval` runs."""
    done = subprocess.run(
        [sys.executable, "-m", "wlora_trl.cli", "config-path", "multi_gpu"], capture_output=True, text=True, check=True
    )
    assert Path(done.stdout.strip()) == packaged_accelerate_configs()["multi_gpu"]
    assert "distributed_type: MULTI_GPU" in Path(done.stdout.strip()).read_text()


def _sft_parser():
    """Stand-in for wlora_trl.recipes.sft.make_parser(): a TrlParser over TRL's SFT dataclasses."""
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig))


def _accelerate_namespace(launch_argv):
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser().parse_args(launch_argv)


def test_sft_launch_command_with_packaged_multi_gpu_config():
    script_args = [
        "--model_name_or_path",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--output_dir",
        "out",
        "--learning_rate",
        "1e-4",
        "--bf16",
        "false",
    ]  # bf16 needs a GPU at parse time
    argv = script_args[:2] + ["--accelerate_config", "multi_gpu", "--num_processes", "4"] + script_args[2:]
    launch_argv = sft_launch_argv(_sft_parser(), argv)
    config = str(packaged_accelerate_configs()["multi_gpu"])
    assert launch_argv == ["--config_file", config, "--num_processes", "4", "-m", "wlora_trl.recipes.sft", *script_args]
    parsed = _accelerate_namespace(launch_argv)
    assert parsed.module and parsed.training_script == "wlora_trl.recipes.sft"
    assert parsed.config_file == config and parsed.num_processes == 4
    assert parsed.training_script_args == script_args


def test_sft_config_yaml_keys_unknown_to_the_script_go_to_accelerate(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: m\noutput_dir: o\nbf16: false\nnum_processes: 2\n")
    launch_argv = sft_launch_argv(_sft_parser(), ["--config", str(config), "--accelerate_config", "single_gpu"])
    assert launch_argv == [
        "--config_file",
        str(packaged_accelerate_configs()["single_gpu"]),
        "--num_processes",
        "2",
        "-m",
        "wlora_trl.recipes.sft",
        "--config",
        str(config),
    ]


def test_unknown_accelerate_config_lists_the_packaged_ones():
    with pytest.raises(ValueError, match="multi_gpu, single_gpu, single_gpu_8bit"):
        sft_launch_argv(_sft_parser(), ["--bf16", "false", "--accelerate_config", "eight_gpus"])


def test_sft_subcommand_launches_accelerate_with_the_script_module(monkeypatch):
    """main(["sft", ...]) imports the script lazily, parses with its parser and hands accelerate the command."""
    import types

    import accelerate.commands.launch as accelerate_launch

    fake_script = types.ModuleType("wlora_trl.recipes.sft")
    fake_script.make_parser = _sft_parser
    monkeypatch.setitem(sys.modules, "wlora_trl.recipes.sft", fake_script)
    launched = []
    monkeypatch.setattr(accelerate_launch, "launch_command", launched.append)

    assert main(["sft", "--bf16", "false", "--accelerate_config", "single_gpu_8bit"]) == 0
    (namespace,) = launched
    assert namespace.module and namespace.training_script == "wlora_trl.recipes.sft"
    assert namespace.config_file == str(packaged_accelerate_configs()["single_gpu_8bit"])
    assert namespace.training_script_args == ["--bf16", "false"]


def test_base_folder_without_a_tokenizer_is_refused_before_loading(tmp_path, capsys, no_model_load):
    """It used to fail late, inside lm-eval, with a cryptic message."""
    _tiny_llama(64).save_pretrained(tmp_path / "weights_only")
    err = _refused(capsys, ["eval", "--model", str(tmp_path / "weights_only"), "--tasks", "boolq"])
    assert "holds no tokenizer" in err and "tokenizer.save_pretrained(path)" in err


def test_no_git_noise_outside_a_checkout(tiny, data_dir, tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` in the working directory; outside a checkout git's "fatal: not a git repository"
    used to land on the user's terminal."""
    base, _ = tiny
    monkeypatch.chdir(tmp_path)
    argv = [
        "eval",
        "--model",
        str(base),
        "--tasks",
        "boolq",
        "--limit",
        "1",
        "--device",
        "cpu",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert "not a git repository" not in capfd.readouterr().err
