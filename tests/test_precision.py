"""Low precision and memory savers: 8-bit bases (and 8-bit or NF4 mixture-of-experts bases), bf16, the fp16 GradScaler,
gradient checkpointing."""

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.testing_utils import addition_lm_dataset, cpu_args, sft_args, sums_dataset, tiny_llama, tiny_qwen3_moe
from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer, WeightLoraTrainer
from wlora_trl.surgery import innermost_optimizer

IDS = torch.arange(3, 35).reshape(2, 16)


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def test_8bit_base_through_switch_and_export(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    int8 = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=int8, device_map="cpu")
    trainer = WeightLoraSFTTrainer(
        model=model,
        args=sft_args(tmp_path / "run"),
        train_dataset=sums_dataset(),
        processing_class=tokenizer,
        peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3),
    )
    # TRL casts adapters on quantized bases to bf16; omega stays fp32.
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert trainer.weight_lora.omega.dtype == torch.float32
    trainer.train()
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    dropped = [a.module for a in trainer.weight_lora.adapters if not a.kept]
    assert all(type(trainer.model.base_model.model.get_submodule(name)) is bnb.nn.Linear8bitLt for name in dropped)
    trainer.save_model(str(tmp_path / "adapter"))
    trained = _logits(trainer.model)

    fresh_int8 = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=int8, device_map="cpu")
    reloaded = PeftModel.from_pretrained(fresh_int8, tmp_path / "adapter")
    # PEFT reloads adapters on an int8 base in fp32 (there is no float base dtype to follow); bf16 -> fp32 is
    # exact, so the weights must match bit for bit, and computed in bf16 as trained, so must the logits.
    trained_lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    reloaded_lora = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert {n.replace(".default", "") for n in trained_lora} == set(reloaded_lora)
    for name, p in trained_lora.items():
        assert torch.equal(reloaded_lora[name.replace(".default", "")], p.float()), name
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    torch.testing.assert_close(_logits(reloaded), trained, rtol=0, atol=1e-5)

    bf16_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    on_bf16 = PeftModel.from_pretrained(bf16_base, tmp_path / "adapter")
    kept = {a.module for a in trainer.weight_lora.adapters if a.kept}
    lora_modules = {n.removeprefix("base_model.model.") for n, m in on_bf16.named_modules() if hasattr(m, "lora_A")}
    assert lora_modules == kept
    # Same adapter on an unquantized base: only int8 and bf16 rounding separate the two.
    assert (_logits(on_bf16) - trained).abs().max().item() < 0.1


def test_bf16_weights_and_autocast(tmp_path):
    args = cpu_args(tmp_path, bf16=True, max_steps=6)
    cfg = WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3)
    trainer = WeightLoraTrainer(
        tiny_llama().to(torch.bfloat16), args, train_dataset=addition_lm_dataset(), peft_config=cfg
    )
    assert trainer.weight_lora.omega.dtype == torch.float32
    adapter_dtypes = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n}
    omega_seen = []
    switch = trainer._switch
    trainer._switch = lambda: (omega_seen.append(trainer.weight_lora.omega.detach().clone()), switch())
    trainer.train()
    (omega,) = omega_seen
    assert omega.dtype == torch.float32 and int(omega.ne(0).sum()) == 7 and bool(omega.ne(1).any())
    # PEFT keeps adapters on a bf16 base in fp32 (autocast_adapter_dtype); the switch must not change that.
    assert {p.dtype for n, p in trainer.model.named_parameters() if "lora_" in n} == adapter_dtypes
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_fp16_grad_scaler_unscales_omega_and_skips_with_the_step(tmp_path, optim):
    """With a real GradScaler: omega sees the unscaled gradient, and a skipped step leaves omega alone.

    The scaler skips `step()` of a plain optimizer, but steps a fused one anyway with `found_inf` set.
    """
    cfg = WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3, init_lora_weights="gaussian")
    trainer = WeightLoraTrainer(
        tiny_llama(), cpu_args(tmp_path, optim=optim), train_dataset=addition_lm_dataset(), peft_config=cfg
    )
    model, weight_lora = trainer.model, trainer.weight_lora
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)  # as after a few steps: omega has a gradient
    optimizer = trainer.create_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.accelerator.scaler = scaler

    model(input_ids=IDS, labels=IDS).loss.backward()
    true_grad = weight_lora.take_omega_grad()
    optimizer.zero_grad()

    scaler.scale(model(input_ids=IDS, labels=IDS).loss).backward()
    trainer._omega_grad = trainer._unscale(weight_lora.take_omega_grad())
    torch.testing.assert_close(trainer._omega_grad, true_grad, rtol=1e-5, atol=1e-9)

    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == (optim == "adamw_torch_fused")
    lora_b.grad[0, 0] = float("inf")  # overflow
    before = weight_lora.omega.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight_lora.omega, before)
    # A fused optimizer is stepped with found_inf set, so omega's pre-hook runs and records the skip; a plain one
    # is not stepped at all (the trainer records that skip at the next step, checked on a GPU in tests/gpu).
    fused = optim == "adamw_torch_fused"
    assert weight_lora.omega_steps["skipped_by_grad_scaler"] == int(fused)

    optimizer.zero_grad()
    scaler.scale(model(input_ids=IDS, labels=IDS).loss).backward()
    trainer._omega_grad = trainer._unscale(weight_lora.take_omega_grad())
    scaler.step(optimizer)  # finite: the pre-hook takes omega's StoIHT step
    assert int(weight_lora.omega.ne(0).sum()) == weight_lora.k
    assert innermost_optimizer(optimizer).state  # and AdamW stepped the adapters


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_selection(tmp_path, tokenizer, use_reentrant):
    def omega_at_switch(path, checkpointing):
        args = sft_args(
            path,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant} if checkpointing else None,
        )
        trainer = WeightLoraSFTTrainer(
            model=tiny_llama(),
            args=args,
            train_dataset=sums_dataset(),
            processing_class=tokenizer,
            peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=4),
        )
        seen = []
        switch = trainer._switch
        trainer._switch = lambda: (seen.append(trainer.weight_lora.omega.detach().clone()), switch())
        trainer.train()
        return seen[0]

    plain = omega_at_switch(tmp_path / "plain", checkpointing=False)
    checkpointed = omega_at_switch(tmp_path / "ckpt", checkpointing=True)
    assert bool(plain.ne(1).any())
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


def test_cpu_bf16_autocast_keeps_omega_fp32_and_the_selection_deterministic(tmp_path):
    """The recipes now train under bf16 autocast on CPUs with native bf16: omega's arithmetic stays fp32 and two
    identical runs select identically."""

    def omega_at_switch(path):
        cfg = WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=4, init_lora_weights="gaussian")
        trainer = WeightLoraTrainer(
            tiny_llama(), cpu_args(path, bf16=True, max_steps=6), train_dataset=addition_lm_dataset(), peft_config=cfg
        )
        seen = []
        switch = trainer._switch
        trainer._switch = lambda: (seen.append(trainer.weight_lora.omega.detach().clone()), switch())
        assert all(p.dtype == torch.float32 for p in trainer.weight_lora.omega_parameters())
        trainer.train()
        return seen[0], [a.module for a in trainer.weight_lora.adapters if a.kept]

    first, second = omega_at_switch(tmp_path / "a"), omega_at_switch(tmp_path / "b")
    assert first[0].dtype == torch.float32 and bool(first[0].ne(1).any())
    assert torch.equal(first[0], second[0]) and first[1] == second[1]


QUANTIZED_MOE_RELOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base_dir, adapter_dir, kind, out = sys.argv[1:]
quantization = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
}[kind]
base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map="cpu")
model = PeftModel.from_pretrained(base, adapter_dir).eval()
ids = torch.arange(3, 35).reshape(2, 16)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
    with model.disable_adapter():
        without = model(input_ids=ids).logits.float()
torch.save({"logits": logits, "without": without}, out)
assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
"""


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_mixture_of_experts_base_keeps_experts_blocks_and_reloads_with_stock_peft(tmp_path, kind):
    """bitsandbytes quantizes nn.Linear layers only: a Qwen3-MoE's attention is 8-bit or NF4, its 3-D experts and
    its router stay float, and the experts blocks are units that train, are kept and reload on a fresh quantized base
    in a process without wlora_trl."""
    base_dir = tmp_path / "base"
    tiny_qwen3_moe(seed=0).save_pretrained(base_dir)
    quantization = {
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    }[kind]
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map="cpu")
    # 12 units (2 layers x q, k, v, o, experts block, router): K = 10 keeps experts blocks on this data.
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3, k=10)
    trainer = WeightLoraTrainer(
        model, cpu_args(tmp_path / "run", max_steps=6), train_dataset=addition_lm_dataset(), peft_config=cfg
    )
    quantized = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert type(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is quantized
    assert [u.kind for u in trainer.weight_lora.units].count("experts") == 2
    trainer.train()
    kept = [a.module for a in trainer.weight_lora.adapters if a.kept]
    assert len(kept) == 10 and any(module.endswith("mlp.experts") for module in kept)
    trainer.save_model(str(tmp_path / "adapter"))
    trained = _logits(trainer.model)

    out = tmp_path / "reloaded.pt"
    command = [sys.executable, "-c", QUANTIZED_MOE_RELOAD, str(base_dir), str(tmp_path / "adapter"), kind, str(out)]
    subprocess.run(command, check=True, timeout=300)
    reloaded = torch.load(out)
    torch.testing.assert_close(reloaded["logits"], trained, rtol=0, atol=1e-5)
    assert (reloaded["logits"] - reloaded["without"]).abs().max() > 1e-3  # the adapter's own effect
