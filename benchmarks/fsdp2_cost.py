"""What mask mode's dropped adapters cost under FSDP2, measured in one run.

    torchrun --nproc_per_node 2 benchmarks/fsdp2_cost.py               # SmolLM2-135M-Instruct, 2 gloo ranks, CPU
    torchrun --nproc_per_node 8 benchmarks/fsdp2_cost.py --model llama3-8b-shapes --dtype bfloat16   # GPUs, NCCL

Under FSDP2 the switch cannot remove modules, so the dropped adapters stay in the model: zeroed, frozen, switched
off on their layer (no LoRA compute, no gradient) and out of the optimizer. What they still cost: their sharded
parameters, and their share of every all-gather (FSDP2 gathers a layer's parameters as one group, frozen or not).
Arms, each sharded with `fully_shard` per decoder layer and at the root, each an optimizer step on the same batch:

  lora_same  stock LoRA on exactly the kept modules (the two-stage route's stage 2)     the baseline
  masked     WeightLoRA after its mask-mode switch (K = n/2), as the trainers run it   the cost of mask mode
  lora       stock LoRA on all n modules                                               for scale

Reported: median step time (steps interleaved round by round, after a barrier; rank 0's clock) and its ratio to
lora_same; per rank, the bytes held by LoRA parameters and by their optimizer state; and the bytes of LoRA
parameters each all-gather round moves (FSDP2 gathers each layer in the forward and again in the backward).
Each arm loads its own copy of the base, so at 8B shapes on few GPUs mind the memory (three sharded copies).

CPU timing and glibc: malloc serves a buffer above its mmap threshold (adjusted at run time, up to 32 MiB) with
fresh pages that fault in on every step, and FSDP2's per-layer all-gather buffers of a 135M model sit near that
size, so which arm pays for page faults depends on a few MiB (measured: masked / lora_same 1.117 with glibc's
defaults, 0.996 and 1.010 in two runs without the faults; the JSONs are in benchmarks/results/). On a CPU the
benchmark therefore fixes the thresholds high (`--malloc steady`, the default; `--malloc default` keeps glibc's); a
GPU's caching allocator has no such effect.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.speed import Variant, autocast_dtype, load_base, make_batch  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraModel  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ["lora_same", "masked", "lora"]


def steady_malloc() -> None:
    """glibc: serve large buffers from the heap, and keep freed memory, so no step pays for fresh page faults."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # mallopt parameters (malloc.h)
    accepted = [
        libc.mallopt(m_mmap_threshold, 32 * 2**20),  # the largest glibc takes on 64-bit (HEAP_MAX_SIZE / 2)
        libc.mallopt(m_trim_threshold, 2**31 - 1),
        libc.mallopt(m_top_pad, 2**30),
    ]
    if not all(accepted):
        raise RuntimeError(f"glibc refused a malloc threshold ({accepted}): run with --malloc default")


def shard(model) -> None:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def local_bytes(tensor: torch.Tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


class Arm(Variant):
    """speed.py's variant (a model, its optimizer on what trains, one step), sharded, with what it holds per rank."""

    def lora_parameters(self) -> list[torch.Tensor]:
        return [p for name, p in self.model.named_parameters() if ".lora_" in name]

    def sizes(self) -> dict[str, int]:
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        return {
            "lora_parameter_bytes_per_rank": sum(local_bytes(p) for p in self.lora_parameters()),
            "optimizer_state_bytes_per_rank": sum(local_bytes(t) for t in state),
            "lora_bytes_per_all_gather_round": sum(p.numel() * p.element_size() for p in self.lora_parameters()),
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }


def build_arms(args, device: str, rank: int) -> tuple[dict[str, Arm], list[str]]:
    dtype, autocast = getattr(torch, args.dtype), autocast_dtype(args)

    def base():
        torch.manual_seed(0)  # random-weight models: every arm the same base
        return load_base(args.model, dtype, device, args.layers)

    config = WeightLoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=TARGETS, selection_steps=2)
    weight_lora = WeightLoraModel(get_peft_model(base(), config), max_steps=10, mask_mode=True)
    batch = make_batch(weight_lora.model.config.vocab_size, args.batch, args.seq, device, seed=rank)
    shard(weight_lora.model)
    masked = Arm(weight_lora.model, weight_lora, autocast)
    for _ in range(weight_lora.selection_steps):  # a real sharded warm-up, then the mask-mode switch
        masked.step(batch)
    weight_lora.switch(masked.optimizer, seed=0)
    kept = [a.module for a in weight_lora.adapters if a.kept]
    arms = {"masked": masked}
    for name, targets in (("lora_same", kept), ("lora", TARGETS)):
        model = get_peft_model(base(), LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets))
        shard(model)
        arms[name] = Arm(model, None, autocast)
    return {name: arms[name] for name in ARMS}, kept


def time_arms(arms: dict[str, Arm], batch, rounds: int, device: str) -> dict[str, list[float]]:
    for arm in arms.values():  # untimed: allocator, kernels, the first all-gathers
        arm.step(batch)
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            dist.barrier()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            arm.step(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="as in speed.py: the packaged SmolLM2, a hub id or path, *-shapes",
    )
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (random-weight models)")
    # Not `--r`: torchrun's parser would take it for an abbreviation of its own --rdzv*/--role/--run-path options.
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--batch", type=int, default=1, help="rows per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--malloc", default="steady", choices=["steady", "default"], help="CPU: glibc thresholds")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/fsdp2_cost_...json)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    args.device = device  # autocast_dtype reads it
    if not cuda and args.malloc == "steady":
        steady_malloc()

    arms, kept = build_arms(args, device, rank)
    vocab = arms["lora"].model.config.vocab_size
    batch = make_batch(vocab, args.batch, args.seq, device, seed=100 + rank)  # each rank its own rows
    times = time_arms(arms, batch, args.rounds, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "command": "torchrun --nproc_per_node {} benchmarks/fsdp2_cost.py {}".format(world, " ".join(sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "world_size": world,
            "backend": dist.get_backend(),
        },
        "versions": {"torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "adapters": {"n": len(arms["masked"].weight_lora.adapters), "kept": len(kept)},
        "median_step_seconds": median,
        "step_seconds": times,
        "ratios_to_lora_same": {name: median[name] / median["lora_same"] for name in ARMS},
        "sizes": {name: arm.sizes() for name, arm in arms.items()},
    }
    if rank == 0:
        out = Path(args.output) if args.output else default_output(args, cuda, world)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(render(result))
        print(f"wrote {out}")
    dist.destroy_process_group()


def default_output(args, cuda: bool, world: int) -> Path:
    model = Path(args.model).name.lower()
    return REPO / "benchmarks" / "results" / f"fsdp2_cost_{model}_{'cuda' if cuda else 'cpu'}_x{world}.json"


def render(result: dict) -> str:
    """The README's table for one result."""
    lines = [
        "| arm | median step (s) | / lora_same | trainable params | LoRA params per rank (MiB) | optimizer state per "
        "rank (MiB) | LoRA MiB per all-gather round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for name in ARMS:
        size = result["sizes"][name]
        lines.append(
            f"| {name} | {result['median_step_seconds'][name]:.3f} | {result['ratios_to_lora_same'][name]:.3f} | "
            f"{size['trainable_parameters']:,} | {size['lora_parameter_bytes_per_rank'] / mib:.2f} | "
            f"{size['optimizer_state_bytes_per_rank'] / mib:.2f} | {size['lora_bytes_per_all_gather_round'] / mib:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
