"""CUDA memory per phase of a real Trainer run: LoRA, WeightLoRA and WeightLoRA+ on the same batches.

    python benchmarks/gpu/memory.py --output memory.json                      # SmolLM2-135M shapes, bf16, CUDA
    python benchmarks/gpu/memory.py --output memory.json --dry-run            # tiny model on the CPU: no numbers

Each method trains `--max_steps` steps of `WeightLoraTrainer` / `Trainer` (bf16 weights, bf16 autocast, AdamW) on
random tokens of a model with random weights. Per step: `torch.cuda.max_memory_allocated` (the peak is reset as
each step begins) and `memory_allocated` as it ends. Phases: the warm-up (steps 1..T) and after the switch (steps
T+1..; the switch happens at the start of step T+1, so its transient counts there). LoRA is split at the same step.
Checks: after the switch WeightLoRA peaks below LoRA, and holds less than it did during the warm-up (the dropped
adapters, their gradients and AdamW moments are gone, not merely unused).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import load_base  # noqa: E402

from wlora_trl import WeightLoraConfig, WeightLoraTrainer  # noqa: E402

METHODS = ["lora", "weightlora", "weightlora_plus"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RandomTokens(Dataset):
    def __init__(self, rows: int, seq: int, vocab: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (rows, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def measure(method: str, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = args.device == "cuda"
    torch.manual_seed(0)
    base = load_base(args.model, getattr(torch, args.dtype), args.device, None)
    if cuda:
        torch.cuda.synchronize()
    base_bytes = torch.cuda.memory_allocated() if cuda else None
    training_args = TrainingArguments(
        str(Path(args.work_dir) / method),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        bf16=args.dtype == "bfloat16",
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    data = RandomTokens(args.batch * args.max_steps, args.seq, base.config.vocab_size)
    if method == "lora":
        model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS))
        trainer = Trainer(model, training_args, train_dataset=data)
    else:
        cfg = WeightLoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            target_modules=TARGETS,
            selection_steps=args.T,
            plus=method == "weightlora_plus",
        )
        trainer = WeightLoraTrainer(base, training_args, train_dataset=data, peft_config=cfg)

    steps: list[dict] = []

    class PerStep(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            steps.append(
                {
                    "peak": torch.cuda.max_memory_allocated() if cuda else None,
                    "allocated": torch.cuda.memory_allocated() if cuda else None,
                    "trainable": sum(p.numel() for p in kw["model"].parameters() if p.requires_grad),
                }
            )

    trainer.add_callback(PerStep())
    trainer.train()
    warmup, after = steps[: args.T], steps[args.T :]
    result = {
        "base_weights_bytes": base_bytes,
        "steps": steps,
        "warmup": {
            "peak": _max(warmup, "peak"),
            "allocated_at_end": warmup[-1]["allocated"],
            "trainable": warmup[-1]["trainable"],
        },
        "after_switch": {
            "peak": _max(after, "peak"),
            "allocated_at_end": after[-1]["allocated"],
            "trainable": after[-1]["trainable"],
        },
    }
    if method != "lora":
        result["kept"] = trainer.weight_lora.k
        result["adapters"] = trainer.weight_lora.num_adapters
    del trainer, base
    if cuda:
        torch.cuda.empty_cache()
    return result


def _max(steps: list[dict], key: str):
    values = [s[key] for s in steps if s[key] is not None]
    return max(values) if values else None


def checks(results: dict) -> dict[str, bool | None]:
    lora, wl = results["lora"], results["weightlora"]
    if lora["after_switch"]["peak"] is None:
        return {}
    return {
        "weightlora peak after switch < lora": wl["after_switch"]["peak"] < lora["after_switch"]["peak"],
        "weightlora allocated after switch < during warm-up": (
            wl["after_switch"]["allocated_at_end"] < wl["warmup"]["allocated_at_end"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default="smollm2-135m-shapes")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--T", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--work_dir", default="/tmp/wlora_memory")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: the code path, no numbers")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.dry_run:
        args.model, args.batch, args.seq, args.dtype = "tiny", 2, 16, "float32"

    results = {method: measure(method, args) for method in METHODS}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "settings": {k: getattr(args, k) for k in ["model", "r", "batch", "seq", "max_steps", "T", "dtype", "device"]},
        "methods": results,
        "checks": checks(results),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    print(f"{'method':<17}{'warm-up peak':>14}{'after peak':>12}{'warm-up held':>14}{'after held':>12}  (MiB)")
    for method, r in results.items():
        print(
            f"{method:<17}{mib(r['warmup']['peak']):>14}{mib(r['after_switch']['peak']):>12}"
            f"{mib(r['warmup']['allocated_at_end']):>14}{mib(r['after_switch']['allocated_at_end']):>12}"
        )
    for check, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
