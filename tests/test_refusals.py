"""Bad input is refused before any training step, with a message that says what to change."""

import pytest
from peft import IA3Config, LoraConfig, get_peft_model
from transformers.trainer_utils import FSDPOption
from trl import SFTConfig

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama, tiny_qwen3_moe
from wlora_trl import WeightLoraConfig, WeightLoraModel, WeightLoraSFTTrainer, WeightLoraTrainer

CFG = dict(r=4, target_modules="all-linear", selection_steps=3)


def _build(tmp_path, model=None, peft_config=None, **args):
    model = tiny_llama() if model is None else model
    return WeightLoraTrainer(
        model, cpu_args(tmp_path, **args), train_dataset=addition_lm_dataset(), peft_config=peft_config
    )


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(k=15), "asks to keep 15 adapters but the model has only 14"),
        (dict(k=0.05), "keeps 0 of the 14 adapters"),
        (dict(plus=True, k=5), "plus=True keeps K = n/2 = 7"),
        (dict(selection_steps=10), "max_steps=10"),
    ],
)
def test_k_and_t_are_refused_at_construction(tmp_path, cfg, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        _build(tmp_path, peft_config=WeightLoraConfig(**{**CFG, **cfg}))


def test_t_beyond_an_epoch_based_run_is_refused_before_the_first_step(tmp_path):
    trainer = WeightLoraTrainer(
        tiny_llama(),
        cpu_args(tmp_path, max_steps=-1, num_train_epochs=1),
        train_dataset=addition_lm_dataset(rows=16),
        peft_config=WeightLoraConfig(**{**CFG, "selection_steps": 5}),
    )
    # 16 rows / batch 4 = 4 steps, known only once training starts; the user set epochs, so the message says what
    # they come to rather than naming a max_steps the user never set.
    epochs = "num_train_epochs=1 over 16 examples, 4 examples per optimizer step, comes to 4 optimizer steps"
    with pytest.raises(ValueError, match=f"the run's {epochs}"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_plain_lora_config_and_missing_adapters_are_refused(tmp_path):
    with pytest.raises(TypeError, match="use wlora_trl.WeightLoraConfig|needs wlora_trl.WeightLoraConfig"):
        _build(tmp_path, peft_config=LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="pass peft_config=WeightLoraConfig"):
        _build(tmp_path)
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="was made from IA3Config"):
        _build(tmp_path, model=ia3)


def test_model_without_lora_layers_on_linear_modules_is_refused():
    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=4, target_modules=["embed_tokens"], selection_steps=3))
    with pytest.raises(ValueError, match="cannot select LoRA adapters on embedding layers"):
        WeightLoraModel(model)


def test_several_adapters_are_refused(tmp_path):
    model = get_peft_model(tiny_llama(), WeightLoraConfig(**CFG))
    model.add_adapter("second", WeightLoraConfig(**CFG))
    with pytest.raises(ValueError, match="has 2 adapters"):
        _build(tmp_path, model=model)


def test_lora_variants_are_refused():
    with pytest.raises(ValueError, match="use_dora"):
        WeightLoraConfig(**CFG, use_dora=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"fsdp": [FSDPOption.FULL_SHARD], "fsdp_config": {"version": 1}},
            "does not support FSDP version 1.*FSDP2.*DeepSpeed ZeRO-2 / ZeRO-3.*wlora-trl select",
        ),
        ({"load_best_model_at_end": True}, "load_best_model_at_end=True is not supported"),
    ],
)
def test_unsupported_training_setups_are_refused(tmp_path, fields, message):
    # TrainingArguments will not even build FSDP settings on one CPU process; set them afterwards. (DeepSpeed's
    # refusals: tests/test_deepspeed_trainer.py.)
    args = cpu_args(tmp_path)
    for field, value in fields.items():
        setattr(args, field, value)
    with pytest.raises(ValueError, match=message):
        WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=WeightLoraConfig(**CFG))


def test_sft_trainer_refuses_before_building_anything(tmp_path, tokenizer):
    args = SFTConfig(str(tmp_path), max_steps=10, use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(TypeError, match="needs wlora_trl.WeightLoraConfig"):
        WeightLoraSFTTrainer(
            "this-model-is-never-loaded",
            args=args,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )


def test_several_gpus_in_one_process_are_refused(tmp_path):
    """Without a launcher on a multi-GPU host the Trainer would train through nn.DataParallel, whose replicas
    cannot share omega's gates; refuse it at construction and name the launchers."""
    args = cpu_args(tmp_path)
    _ = args.device  # resolves the device setup, which sets the GPU count
    args._n_gpu = 2  # what TrainingArguments finds on a host with two visible GPUs and no launcher
    with pytest.raises(ValueError, match="torch.nn.DataParallel, which WeightLoRA does not support.*accelerate launch"):
        WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=WeightLoraConfig(**CFG))


def test_mixture_of_experts_with_lora_dropout_is_refused_with_what_to_change(tmp_path):
    """PEFT adds LoRA on the expert and router parameters (target_parameters) while wrapping with all-linear, and
    its wrapper cannot apply dropout; the refusal says to set lora_dropout=0 (the experts are selectable units)."""
    with pytest.raises(ValueError, match=r"expert \(and router\) weights as parameters.*set lora_dropout=0"):
        _build(tmp_path, model=tiny_qwen3_moe(), peft_config=WeightLoraConfig(**CFG, lora_dropout=0.1))
    with pytest.raises(
        ValueError, match=r"target_parameters=\['experts.gate_up_proj'\] with lora_dropout=0.1.*lora_dropout=0"
    ):
        WeightLoraConfig(**CFG, target_parameters=["experts.gate_up_proj"], lora_dropout=0.1)


@pytest.mark.parametrize(
    "targets, extra, instead",
    [
        (["embed_tokens", "q_proj"], {}, "'q_proj'"),
        (["lm_head", "q_proj"], {"ensure_weight_tying": True}, "'lm_head', 'q_proj'"),
    ],
    ids=["embedding", "tied_lm_head"],
)
def test_lora_on_embeddings_is_refused(tmp_path, targets, extra, instead):
    """Embedding adapters used to be skipped by the selection while they kept training, and left out of the export,
    so the reloaded adapter was not the trained model. ensure_weight_tying=True adds one for a tied lm_head."""
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    cfg = WeightLoraConfig(r=4, target_modules=targets, selection_steps=3, **extra)
    with pytest.raises(ValueError, match=rf"embedding layers \(model.embed_tokens\).*Use target_modules=\[{instead}\]"):
        _build(tmp_path, model=model, peft_config=cfg)


def test_a_model_after_the_switch_is_refused_with_what_it_is(tmp_path):
    first = _build(tmp_path / "first", peft_config=WeightLoraConfig(**CFG), max_steps=4)
    first.train()
    with pytest.raises(ValueError, match="went through WeightLoRA's switch already"):
        _build(tmp_path / "second", model=first.model)
