"""What mask mode's dropped adapters cost under DeepSpeed ZeRO-3, measured in one run.

    deepspeed --num_gpus 2 benchmarks/deepspeed_cost.py           # SmolLM2-135M-Instruct, 2 gloo ranks, CPU
    deepspeed --num_gpus 8 benchmarks/deepspeed_cost.py --model llama3-8b-shapes --precision bf16   # GPUs, NCCL

ZeRO's optimizer cannot lose a parameter, so under DeepSpeed the switch runs in mask mode: the dropped adapters stay
in the model and in the optimizer, zeroed (working copy, fp32 master, Adam moments) and switched off on their layer.
The arms are fsdp2_cost.py's, each a ZeRO-3 engine over its own copy of the base, each an optimizer step (forward,
backward, `engine.step()`) on the same batch:

  lora_same  stock LoRA on exactly the kept modules (the two-stage route's stage 2)     the baseline
  masked     WeightLoRA after its mask-mode switch (K = n/2), as the trainers run it   the cost of mask mode
  lora       stock LoRA on all n modules                                               for scale

under two ZeRO-3 settings of `stage3_param_persistence_threshold`: DeepSpeed's default (1e5 elements, which every
LoRA matrix of these models is below: ZeRO-3 then keeps LoRA weights whole on every rank and all-gathers them after
every optimizer step) and 0 (LoRA weights partitioned, gathered only when their module runs, which a dropped adapter's
never does).

Reported per arm: median step time (after `--untimed_steps` steps, in which ZeRO-3 records its prefetch trace; steps
interleaved round by round, after a barrier; rank 0's clock) and its ratio to lora_same in the same setting; per rank,
the bytes of LoRA working copies (partitions, plus the whole tensor where ZeRO-3 keeps it gathered), of fp32 masters and
of optimizer state; and the bytes of one step's collectives by kind, as DeepSpeed's comms logger counts them (an extra,
untimed step with the logger on).

On a CPU the benchmark fixes glibc's malloc thresholds high, as fsdp2_cost.py does (`--malloc steady`, the default).

Committed (benchmarks/results/deepspeed_cost_smollm2-135m-instruct_cpu_x2.{json,md}; `--precision bf16 --rounds 4` on
2 gloo processes of a shared 2-core CPU, 6 min): a step of the masked arm takes 1.073 of lora_same's with DeepSpeed's
default persistence (the dropped adapters are all-gathered after every step: +1.09 MiB) and 1.009 with threshold 0
(never gathered); either way it holds LoRA-on-all-modules' working copies, fp32 masters and Adam moments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.fsdp2_cost import ARMS, TARGETS, steady_malloc, time_arms  # noqa: E402
from benchmarks.speed import load_base, make_batch  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraModel  # noqa: E402
from wlora_trl.engines.deepspeed import ZeroParameterAccess, zero_optimizer, zero_partitions  # noqa: E402

SETTINGS = {"default": None, "partitioned": 0}  # stage3_param_persistence_threshold (None: DeepSpeed's default)


def zero3_config(args, persistence: int | None) -> dict:
    zero = {"stage": 3, **({"stage3_param_persistence_threshold": persistence} if persistence is not None else {})}
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW, as the Trainer builds it
        "bf16": {"enabled": args.precision == "bf16"},
    }


class ZeroArm:
    """One arm: a ZeRO-3 engine over a PEFT model with torch AdamW (as the Trainer hands DeepSpeed), and what it holds
    per rank. `step` is fsdp2_cost's step under DeepSpeed; for WeightLoRA during the warm-up, omega's step follows."""

    def __init__(self, model, weight_lora: WeightLoraModel | None, config: dict, lr: float = 1e-4):
        import deepspeed

        self.weight_lora = weight_lora
        params = (
            weight_lora.trainable_parameters() if weight_lora else [p for p in model.parameters() if p.requires_grad]
        )
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(params, lr=lr), config=config
        )

    def step(self, batch) -> None:
        loss = self.model(**batch).loss
        self.model.backward(loss)
        self.model.step()
        if self.weight_lora is not None and not self.weight_lora.switched:
            self.weight_lora.omega_step()

    def lora_parameters(self) -> list[torch.Tensor]:
        return [p for name, p in self.model.module.named_parameters() if ".lora_" in name]

    def sizes(self) -> dict[str, int]:
        lora = self.lora_parameters()
        zero = zero_optimizer(self.optimizer)
        flats = [flat for _, flat in zero_partitions(zero)]
        state = [
            t for flat in flats for t in zero.optimizer.state.get(flat, {}).values() if torch.is_tensor(t) and t.dim()
        ]
        return {
            # The partition each rank owns, plus the whole tensor where ZeRO-3 keeps it gathered (persistent).
            "lora_working_bytes_per_rank": sum(_bytes(p.ds_tensor) + _bytes(p.data) for p in lora),
            "lora_partition_bytes_per_rank": sum(_bytes(p.ds_tensor) for p in lora),
            "lora_persistent_bytes_per_rank": sum(_bytes(p.data) for p in lora),
            "master_bytes_per_rank": sum(_bytes(flat) for flat in flats),
            "optimizer_state_bytes_per_rank": sum(_bytes(t) for t in state),
            "trainable_parameters": sum(p.ds_numel for p in self.model.module.parameters() if p.requires_grad),
            "parameters_in_optimizer": sum(len(params) for params, _ in zero_partitions(zero)),
        }


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def build_arms(args, persistence: int | None, device: str, rank: int) -> tuple[dict[str, ZeroArm], list[str], int]:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = zero3_config(args, persistence)

    def base():
        torch.manual_seed(0)  # random-weight models: every arm the same base
        return load_base(args.model, dtype, device, args.layers)

    lora = dict(r=args.lora_r, lora_alpha=2 * args.lora_r)
    weightlora_config = WeightLoraConfig(**lora, target_modules=TARGETS, selection_steps=2)
    weight_lora = WeightLoraModel(get_peft_model(base(), weightlora_config), max_steps=10, mask_mode=True)
    weight_lora.parameter_access = ZeroParameterAccess()
    masked = ZeroArm(weight_lora.model, weight_lora, config)
    batch = make_batch(weight_lora.model.config.vocab_size, args.batch, args.seq, device, seed=rank)
    for _ in range(weight_lora.selection_steps):  # a real ZeRO-3 warm-up, then the mask-mode switch
        masked.step(batch)
    weight_lora.switch(masked.optimizer, seed=0)
    kept = [a.module for a in weight_lora.adapters if a.kept]
    arms = {"masked": masked}
    for name, targets in (("lora_same", kept), ("lora", TARGETS)):
        arms[name] = ZeroArm(get_peft_model(base(), LoraConfig(**lora, target_modules=targets)), None, config)
    return {name: arms[name] for name in ARMS}, kept, weight_lora.num_adapters


def communication(arm: ZeroArm, batch) -> dict[str, int]:
    """Bytes per collective kind in one step, from DeepSpeed's comms logger (its message sizes), on this rank."""
    from deepspeed import comm

    logger = comm.comms_logger
    logger.comms_dict.clear()
    logger.enabled, logger.prof_all = True, True
    try:
        arm.step(batch)
    finally:
        logger.enabled = False
    totals = {}
    for name, by_size in logger.comms_dict.items():
        totals[name] = sum(int(size) * record[0] for size, record in by_size.items())
    logger.comms_dict.clear()
    return dict(sorted(totals.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="as in speed.py")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (random-weight models)")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--batch", type=int, default=1, help="rows per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--untimed_steps", type=int, default=3, help="steps per arm before the timed rounds")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="DeepSpeed's bf16: fp32 masters")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--malloc", default="steady", choices=["steady", "default"], help="CPU: glibc thresholds")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/deepspeed_cost_...json)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args()
    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if not cuda and args.malloc == "steady":
        steady_malloc()

    results, kept, n = {}, None, None
    for setting in args.settings:
        arms, kept, n = build_arms(args, SETTINGS[setting], device, rank)
        vocab = arms["lora"].model.module.config.vocab_size
        batch = make_batch(vocab, args.batch, args.seq, device, seed=100 + rank)  # each rank its own rows
        for _ in range(args.untimed_steps - 1):  # ZeRO-3 records its prefetch trace over the first steps
            for arm in arms.values():
                arm.step(batch)
        times = time_arms(arms, batch, args.rounds, device)  # one more untimed step per arm, then the rounds
        median = {name: statistics.median(values) for name, values in times.items()}
        if rank == 0:
            print(f"{setting}: median step seconds {median}", flush=True)
        results[setting] = {
            "stage3_param_persistence_threshold": SETTINGS[setting],
            "median_step_seconds": median,
            "step_seconds": times,
            "ratios_to_lora_same": {name: median[name] / median["lora_same"] for name in ARMS},
            "sizes": {name: arm.sizes() for name, arm in arms.items()},
            "communication_bytes_per_step": {name: communication(arm, batch) for name, arm in arms.items()},
        }
        del arms
    result = {
        "command": "deepspeed --num_gpus {} benchmarks/deepspeed_cost.py {}".format(
            world, " ".join(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "world_size": world,
            "backend": dist.get_backend(),
        },
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "local_rank")},
        "adapters": {"n": n, "kept": len(kept)},
        "zero3": results,
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
    return REPO / "benchmarks" / "results" / f"deepspeed_cost_{model}_{'cuda' if cuda else 'cpu'}_x{world}.json"


def render(result: dict) -> str:
    """The table for one result: per ZeRO-3 setting and arm, time, memory per rank and one step's collectives."""
    mib = 2**20
    lines = [
        "| ZeRO-3 setting | arm | median step (s) | / lora_same | LoRA working copies per rank (MiB) | fp32 masters "
        "per rank (MiB) | optimizer state per rank (MiB) | collectives per step (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, block in result["zero3"].items():
        threshold = block["stage3_param_persistence_threshold"]
        label = f"{setting} (persistence {'1e5' if threshold is None else threshold})"
        for name in ARMS:
            size = block["sizes"][name]
            comm = sum(block["communication_bytes_per_step"][name].values())
            lines.append(
                f"| {label} | {name} | {block['median_step_seconds'][name]:.3f} | "
                f"{block['ratios_to_lora_same'][name]:.3f} | {size['lora_working_bytes_per_rank'] / mib:.2f} | "
                f"{size['master_bytes_per_rank'] / mib:.2f} | {size['optimizer_state_bytes_per_rank'] / mib:.2f} | "
                f"{comm / mib:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
