"""The engine seam: detected once, asked through hooks, and the only place that knows which engine runs.

A recording engine registered ahead of the others trains a tiny model through the switch and a resume: every hook
is called, in the run's order, and the run is the one-process run (the recording engine changes nothing). The
source test holds the package to the rule the architecture map states: outside `wlora_trl/engines/` (and the
private-internals module `_compat.py`), no module asks which engine runs.
"""

import pathlib
import re

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer, engines
from wlora_trl.engines import DataParallelEngine, Engine, Fsdp2Engine, MaskModeEngine, ZeroEngine, detect_engine

T, MAX_STEPS = 3, 6
PACKAGE = pathlib.Path(engines.__file__).parent.parent


class RecordingEngine(Engine):
    """The one-process engine, writing down each hook it is asked."""

    calls: list[str] = []

    @classmethod
    def detect(cls, trainer):
        return True

    def _record(self, hook):
        type(self).calls.append(hook)

    def setup(self, trainer):
        self._record("setup")

    def prepare_optimizer(self, optimizer, weight_lora):
        self._record("prepare_optimizer")

    def before_train(self, trainer):
        self._record("before_train")

    def check_wrapper(self, trainer):
        self._record("check_wrapper")

    def before_switch(self, trainer):
        assert not trainer.weight_lora.switched
        self._record("before_switch")

    def after_switch(self, trainer):
        assert trainer.weight_lora.switched
        self._record("after_switch")

    def save_model(self, trainer, directory, padded):
        self._record("save_model")
        super().save_model(trainer, directory, padded)

    def load_checkpoint(self, trainer, checkpoint, load_weights):
        self._record("load_checkpoint")
        super().load_checkpoint(trainer, checkpoint, load_weights)

    def after_optimizer_loaded(self, trainer, checkpoint):
        self._record("after_optimizer_loaded")


def _trainer(output_dir, **overrides):
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=0.5, selection_steps=T)
    args = cpu_args(output_dir, max_steps=MAX_STEPS, **overrides)
    return WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)


def test_a_registered_engine_is_asked_every_hook_in_the_run_s_order(tmp_path, monkeypatch):
    reference = _trainer(tmp_path / "one")
    assert type(reference.engine) is Engine  # one process, nothing forced
    reference.train()
    reference.save_model()

    monkeypatch.setattr(engines, "ENGINES", (RecordingEngine, *engines.ENGINES))
    RecordingEngine.calls = []
    trainer = _trainer(tmp_path / "recorded", save_strategy="steps", save_steps=2)
    assert isinstance(trainer.engine, RecordingEngine)
    trainer.train()
    trainer.save_model()
    calls = RecordingEngine.calls
    first = ["setup", "before_train", "prepare_optimizer", "check_wrapper", "save_model"]
    assert calls[: len(first)] == first, calls  # the checkpoint at step 2 is a save too
    assert calls.count("before_switch") == calls.count("after_switch") == 1
    switch = calls.index("before_switch")
    assert calls[switch + 1] == "after_switch" and calls.count("save_model") == 4  # steps 2, 4, 6 and the final
    # The recording engine is the one-process engine: the same training, the same saved adapter.
    ours = load_file(tmp_path / "recorded" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)

    RecordingEngine.calls = []
    resumed = _trainer(tmp_path / "recorded")
    resumed.train(resume_from_checkpoint=str(tmp_path / "recorded" / "checkpoint-4"))
    assert RecordingEngine.calls[:4] == ["setup", "before_train", "load_checkpoint", "prepare_optimizer"]
    assert "after_optimizer_loaded" in RecordingEngine.calls and "before_switch" not in RecordingEngine.calls


class _FakeAccelerator:
    def __init__(self, processes=1, fsdp2=False, launched=False):
        self.num_processes, self.is_fsdp2 = processes, fsdp2
        launched = launched or processes > 1
        self.distributed_type = DistributedType.MULTI_CPU if launched else DistributedType.NO


class _FakeTrainer:
    def __init__(
        self, processes=1, fsdp2=False, fsdp=False, deepspeed=False, n_gpu=1, forced_mask=False, launched=False
    ):
        self.accelerator = _FakeAccelerator(processes, fsdp2, launched)
        self.is_fsdp_enabled, self.is_deepspeed_enabled = fsdp or fsdp2, deepspeed
        self.args = type("Args", (), {"n_gpu": n_gpu})()
        self._force_mask_mode = forced_mask


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({}, Engine),
        ({"processes": 2}, DataParallelEngine),
        ({"launched": True}, DataParallelEngine),  # a one-process torchrun: accelerate wraps it in DDP on the CPU
        ({"processes": 2, "fsdp2": True}, Fsdp2Engine),
        ({"processes": 2, "deepspeed": True}, ZeroEngine),
        ({"forced_mask": True}, MaskModeEngine),
    ],
    ids=["one_process", "ddp", "ddp_one_process", "fsdp2", "deepspeed", "mask_mode"],
)
def test_each_setting_is_run_by_its_engine(setting, expected):
    engine = detect_engine(_FakeTrainer(**setting))
    assert type(engine) is expected
    assert engine.mask_mode == (expected in (MaskModeEngine, Fsdp2Engine, ZeroEngine))


@pytest.mark.parametrize(
    "setting, message",
    [({"processes": 2, "fsdp": True}, "FSDP version 1"), ({"n_gpu": 2}, "torch.nn.DataParallel")],
    ids=["fsdp1", "data_parallel"],
)
def test_settings_no_engine_runs_are_refused_when_detected(setting, message):
    with pytest.raises(ValueError, match=message):
        detect_engine(_FakeTrainer(**setting))


ENGINE_QUESTIONS = re.compile(
    r"is_deepspeed_enabled|is_fsdp_enabled|accelerator\.is_fsdp2|deepspeed_plugin|fsdp_plugin|num_processes\s*[<>=!]|ddp_inside"
)


def test_no_module_outside_the_engines_asks_which_engine_runs():
    askers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("engines/") or relative == "_compat.py":
            continue
        found = ENGINE_QUESTIONS.findall(path.read_text())
        if found:
            askers[relative] = sorted(set(found))
    assert askers == {}, f"ask wlora_trl.engines instead: {askers}"
    # The rule is checked against something: the engines themselves ask.
    assert ENGINE_QUESTIONS.search((PACKAGE / "engines" / "deepspeed.py").read_text())
