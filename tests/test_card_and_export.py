"""What a user publishes: the model card, the padded export for serving engines, `wlora-trl report`, and the
selection in TensorBoard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.test_export import STOCK_RELOAD
from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer
from wlora_trl.artifacts.export import pad_adapter
from wlora_trl.artifacts.plotting import HEATMAP_FILE
from wlora_trl.cli import main as cli_main
from wlora_trl.state import read_selection

IDS = torch.arange(3, 35).reshape(2, 16)


def _trained(tmp_path, **args):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    cfg = WeightLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3, init_lora_weights="gaussian"
    )
    trainer = WeightLoraTrainer(
        AutoModelForCausalLM.from_pretrained(base_dir), cpu_args(tmp_path / "run", max_steps=6, **args),
        train_dataset=addition_lm_dataset(), peft_config=cfg,
    )  # fmt: skip
    trainer.train()
    return trainer, base_dir


def _stock_logits(base_dir, adapter_dir, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(IDS, tmp_path / "ids.pt")
    command = [sys.executable, "-c", STOCK_RELOAD, str(base_dir), str(adapter_dir), str(tmp_path / "ids.pt")]
    subprocess.run([*command, str(tmp_path / "logits.pt")], check=True)
    return torch.load(tmp_path / "logits.pt")


def test_the_model_card_explains_the_adapter(tmp_path):
    trainer, base_dir = _trained(tmp_path)
    trainer.save_model(str(tmp_path / "adapter"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not PEFT's empty template
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card and "- weightlora" in card
    assert "**WeightLoRA**" in card and "arxiv.org/abs/2506.02724" in card and "@inproceedings{veprikov2026" in card
    assert "| kept (K) | 7 |" in card and "| adapters considered (n) | 14 |" in card
    assert "| kept per projection | q_proj " in card and "PeftModel.from_pretrained" in card
    assert f"]({HEATMAP_FILE})" in card and (tmp_path / "adapter" / HEATMAP_FILE).is_file()
    assert "wlora-trl export --padded" in card and "trainable parameters" in card
    # TRL and transformers write a card into output_dir at checkpoints and push_to_hub: ours.
    trainer.create_model_card()
    assert "**WeightLoRA**" in (tmp_path / "run" / "README.md").read_text()


def test_minimal_export_has_no_patterns_and_the_padded_one_every_pair_with_the_same_function(tmp_path):
    trainer, base_dir = _trained(tmp_path)
    trainer.save_model(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")  # one rank: vLLM and llama.cpp read r
    assert len(config["target_modules"]) == 7

    assert cli_main(["export", "--padded", str(tmp_path / "adapter"), str(tmp_path / "padded")]) == 0
    padded = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
    pairs = {(layer, projection) for layer in range(2)
             for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}  # fmt: skip
    assert {(int(m.split(".")[2]), m.rsplit(".", 1)[-1]) for m in padded["target_modules"]} == pairs
    with safe_open(str(tmp_path / "padded" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 2 * 14 and not padded.get("rank_pattern")
    minimal = _stock_logits(base_dir, tmp_path / "adapter", tmp_path / "a")
    with_padding = _stock_logits(base_dir, tmp_path / "padded", tmp_path / "b")
    with torch.no_grad():
        trained = trainer.model.eval()(input_ids=IDS).logits
    assert (with_padding - trained).abs().max() <= 1e-5 and (minimal - trained).abs().max() <= 1e-5


def test_report_command_renders_a_run_done_elsewhere(tmp_path, capsys):
    trainer, _ = _trained(tmp_path)
    trainer.save_model(str(tmp_path / "adapter"))
    assert cli_main(["report", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "selection_report.md").read_text()
    assert text.startswith("# WeightLoRA: kept 7 of 14 adapters") and "| 0 |" in text and "| 1 |" in text
    assert "Parameters: " in text and "against" in text and "exactly 0 (thresholded out)" in text
    assert (tmp_path / "report" / HEATMAP_FILE).read_bytes()[:4] == b"\x89PNG"
    try:
        cli_main(["report", str(tmp_path / "nothing-here")])
        raise AssertionError("a folder without selection.json was accepted")
    except SystemExit as exit_:
        assert exit_.code == 2 and "nothing-here does not exist" in capsys.readouterr().err


def test_report_on_a_warmup_save_says_nothing_is_dropped_yet(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    trainer = WeightLoraTrainer(
        AutoModelForCausalLM.from_pretrained(base_dir), cpu_args(tmp_path / "run", max_steps=6),
        train_dataset=addition_lm_dataset(), peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3),
    )  # fmt: skip
    trainer.save_model(str(tmp_path / "early"))  # step 0, inside the warm-up
    assert cli_main(["report", str(tmp_path / "early")]) == 0
    text = (tmp_path / "early" / "selection_report.md").read_text()
    assert text.startswith("# WeightLoRA: saved during the warm-up, at step 0 of T = 3")
    assert "all 14 adapters train" in text and "K = 7 will be kept" in text


def test_the_switch_reaches_tensorboard_as_scalars_and_an_image(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5's TensorBoard callback
    trainer, _ = _trained(tmp_path, report_to=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "weight_lora/selection" in tags["images"]
    kept = {
        tag.rsplit("/", 1)[-1]: events.Scalars(tag)[0].value for tag in tags["scalars"] if "weight_lora/kept/" in tag
    }
    assert set(kept) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(kept.values()) == trainer.weight_lora.k


def _refused(capsys, argv) -> str:
    """`wlora-trl` on a damaged folder: exit 2 and one line on stderr, no traceback; returns that line."""
    try:
        cli_main(argv)
        raise AssertionError(f"{argv} was accepted")
    except SystemExit as exit_:
        assert exit_.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _damage_selection(folder, edit) -> None:
    path = folder / "selection.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _swap_a_kept_and_a_dropped(data) -> None:  # n and K still hold; the weights are on the other module
    adapters = data["adapters"]
    kept = next(a for a in adapters if a["kept"])
    dropped = next(a for a in adapters if not a["kept"])
    kept["kept"], dropped["kept"] = False, True


def test_a_selection_that_disagrees_with_its_folder_is_refused_and_nothing_written(tmp_path, capsys):
    # Before: the adapters list cut to 5 of 14 (still n = 14, K = 7) reported 'kept 3 of 14' and padded to an adapter
    # whose config targets 5 modules while its weights hold 9; stock PEFT then computes another function.
    trainer, _ = _trained(tmp_path)
    trainer.save_model(str(tmp_path / "adapter"))
    capsys.readouterr()  # the training's progress bars
    damages = {
        "cut": (lambda data: data.update(adapters=data["adapters"][:5]), "lists 5 adapters but says n = 14"),
        "k": (lambda data: data.update(k=5), "marks 7 adapters kept but says K = 5"),
        "swapped": (_swap_a_kept_and_a_dropped, "holds adapters on 7 modules, but {}/selection.json marks 7 of its "
                    "n = 14 adapters kept: 1 kept there have no weights"),
    }  # fmt: skip
    for name, (edit, message) in damages.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "adapter", folder)
        _damage_selection(folder, edit)
        for argv in (["report", str(folder), "--output_dir", str(tmp_path / f"{name}-report")],
                     ["export", "--padded", str(folder), str(tmp_path / f"{name}-padded")]):  # fmt: skip
            err = _refused(capsys, argv)
            assert f"wlora-trl {argv[0]}: error: " in err and message.format(folder) in err, err
            assert "save it again" in err or "save the adapter again" in err
        assert not (tmp_path / f"{name}-padded").exists() and not (tmp_path / f"{name}-report").exists()
    # The folder as saved reports, exports, and its padded copy (zeros on every dropped module) passes the check too.
    assert cli_main(["report", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "report")]) == 0
    assert cli_main(["export", "--padded", str(tmp_path / "adapter"), str(tmp_path / "padded")]) == 0
    assert cli_main(["report", str(tmp_path / "padded"), "--output_dir", str(tmp_path / "padded-report")]) == 0


def test_a_truncated_weights_file_is_one_line_naming_it(tmp_path, capsys):
    # Before: safetensors' own SafetensorError as a traceback, exit 1, where other damaged folders get one line.
    trainer, _ = _trained(tmp_path)
    trainer.save_model(str(tmp_path / "adapter"))
    capsys.readouterr()
    report = read_selection(tmp_path / "adapter")
    shutil.copytree(tmp_path / "adapter", tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = f"{weights} cannot be read (Error while deserializing header"
    for argv in (["report", str(tmp_path / "cut"), "--output_dir", str(tmp_path / "report")],
                 ["export", "--padded", str(tmp_path / "cut"), str(tmp_path / "padded")]):  # fmt: skip
        err = _refused(capsys, argv)
        assert message in err and "damaged or incomplete" in err and "copy it again" in err, err
    assert not (tmp_path / "padded").exists()
    # From Python too, with the selection in memory (the header is then read by the padding's own load).
    with pytest.raises(ValueError, match="cannot be read .*damaged or incomplete"):
        pad_adapter(tmp_path / "cut", tmp_path / "padded", report=report)
    # The installed command, as a user runs it: exit 2 and the one line.
    command = [sys.executable, "-m", "wlora_trl.cli", "export", "--padded", str(tmp_path / "cut"), str(tmp_path / "p")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"wlora-trl export: error: {message}")
