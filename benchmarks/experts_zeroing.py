"""What dropping single experts inside a kept experts block would save, against dropping the whole block.

    python benchmarks/experts_zeroing.py            # about a minute on 2 CPU cores

The evidence behind a design decision (docs/source/trainers.md, "Mixture-of-experts models"): WeightLoRA selects a
layer's experts adapters as one unit, and one omega per expert (E gates per block) was left out. PEFT's `ParamWrapper`
holds a block's adapters as one `lora_A` of `r*E` rows and one `lora_B` of `r*E` columns, with one rank for every
expert (`rank_pattern` is per parameter, not per expert), and computes every expert's delta in one batched product.
So an expert dropped inside a kept block can only be zeroed: this measures, on one Qwen3-MoE shape (transformers
builds it from a config, random weights), a training step and the saved adapter in three states of the same model:

  all       LoRA on every linear layer and every experts block (`all-linear`), every expert's adapter nonzero
  zeroed    the same, with half of each block's experts' adapters zeroed (what per-expert selection would leave)
  dropped   the experts blocks' and routers' adapters removed (what block selection leaves when it drops them all)

Prints and writes benchmarks/results/experts_zeroing_<machine>.{json,md}: step times as ratios against `all`
measured in the same run (median of --repeats after --warmup), the saved adapter's bytes and its tensors' elements.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import ParamWrapper
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.study import machine  # noqa: E402  (run as a script, the repo is not on sys.path)


def moe_model(args) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


def lora_model(args, experts: bool):
    """LoRA r on `all-linear` (attention, the experts blocks and the routers), or on attention alone (`experts` False:
    what is left when the selection drops every experts block and router)."""
    targets = "all-linear" if experts else ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, init_lora_weights="gaussian")
    model = get_peft_model(moe_model(args), config)
    with torch.no_grad():  # nonzero B everywhere, so every adapter does its full work in the step
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model


@torch.no_grad()
def zero_half_the_experts(model, num_experts: int, r: int) -> int:
    """Zeroes experts 0 .. E/2-1 in every experts wrapper: rows of A (expert outer) and columns of B (expert inner),
    the layout PEFT's `get_delta_factors` reads. Returns the wrappers touched."""
    touched = 0
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            for adapter in module.lora_A:
                a = module.lora_A[adapter].weight  # (r*E, in), expert outer
                b = module.lora_B[adapter].weight  # (out, r*E), expert inner
                if a.shape[0] != r * num_experts and a.shape[0] != 2 * r * num_experts:
                    continue  # the router: one adapter, not per expert
                rank = a.shape[0] // num_experts
                a.view(num_experts, rank, -1)[: num_experts // 2] = 0
                b.view(b.shape[0], rank, num_experts)[:, :, : num_experts // 2] = 0
                touched += 1
    return touched


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def step_seconds(models: dict, args) -> dict[str, float]:
    """Median seconds of a training step per model, timed round-robin (one step of each in turn, so drifts of a
    shared machine fall on every state alike)."""
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    times = {name: [] for name in models}
    for i in range(args.warmup + args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def saved(model) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        file = Path(folder) / "adapter_model.safetensors"
        from safetensors.torch import load_file

        tensors = load_file(file)
        return {
            "bytes": file.stat().st_size,
            "elements": sum(t.numel() for t in tensors.values()),
            "nonzero_elements": sum(int((t != 0).sum()) for t in tensors.values()),
        }


def markdown_table(result: dict) -> str:
    """The table alone, as docs/source/trainers.md shows it (a test holds the page to the committed JSON)."""
    lines = [
        "| state | step (s) | step / all | saved bytes | saved elements | nonzero elements |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["states"].items():
        lines.append(
            f"| {name} | {row['step_s']:.3f} | {row['step_ratio']:.2f} | {row['saved']['bytes']:,} | "
            f"{row['saved']['elements']:,} | {row['saved']['nonzero_elements']:,} |"
        )
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Dropping single experts inside a kept block, against dropping the block",
        "",
        f"Qwen3-MoE shape: {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts (2 per token), LoRA "
        f"r = {s['r']} on every linear layer; a training step (forward and backward) on {s['batch']} x {s['seq']} "
        f"tokens, median of {s['repeats']}. Machine: {result['machine']['cpu_model']}, {result['machine']['threads']} "
        "threads. Command: `python benchmarks/experts_zeroing.py`.",
        "",
        markdown_table(result).rstrip("\n"),
        "",
        "Half the experts zeroed leaves the step's time and the saved adapter's size where they were: PEFT holds a "
        "block's experts adapters as one pair of tensors with one rank for every expert, so a dropped expert can "
        "only be stored and computed as zeros. Dropping the block is what saves.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    models = {"all": lora_model(args, experts=True), "zeroed": lora_model(args, experts=True)}
    touched = zero_half_the_experts(models["zeroed"], args.experts, args.r)
    if touched != 2 * args.layers:
        raise SystemExit(f"expected 2 experts wrappers per layer (gate_up_proj, down_proj), zeroed {touched}")
    models["dropped"] = lora_model(args, experts=False)
    seconds = step_seconds(models, args)
    states = {
        name: {"step_s": seconds[name], "step_ratio": seconds[name] / seconds["all"], "saved": saved(model)}
        for name, model in models.items()
    }

    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "machine": {**machine(), "cpu_model": cpu_model(), "threads": torch.get_num_threads()},
        "states": states,
    }
    text = markdown(result)
    print(text)
    stem = "experts_zeroing_cpu" if result["machine"]["device"] == "cpu" else "experts_zeroing_cuda"
    (args.output_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / f"{stem}.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
