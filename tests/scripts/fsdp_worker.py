"""WeightLoRA in mask mode on a tiny Llama sharded with FSDP2 (`fully_shard` per decoder layer and at the root), gloo.

    torchrun --nproc_per_node 2 tests/scripts/fsdp_worker.py OUT [--plus] [--keep] [--no_shard]
    torchrun --nproc_per_node 1 tests/scripts/fsdp_worker.py OUT --refusals
    torchrun --nproc_per_node 2 tests/scripts/fsdp_worker.py OUT --skew_omega
    torchrun --nproc_per_node 2 tests/scripts/fsdp_worker.py OUT --stop_after S --checkpoint CKPT   (then --resume CKPT)

A global batch of 4 fixed-length rows per step, split evenly over the ranks (every row's tokens all count, so the
mean of the ranks' losses is the global batch's loss); T = 3 of 8 steps. Each rank writes OUT/rank{r}.pt (losses,
omega at the switch, kept set, gathered adapter, logits on a probe, what the switch left behind); rank 0 also saves
the adapter with `save_adapter` to OUT/adapter. `--refusals` checks the errors for a model sharded too early, `--skew_omega` the switch's check that
the ranks agree.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.testing_utils import tiny_llama, tiny_qwen3_moe  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraModel  # noqa: E402
from wlora_trl.engines.access import is_sharded  # noqa: E402
from wlora_trl.state import read_selection, write_selection  # noqa: E402

R, T, STEPS, GLOBAL_BATCH = 4, 3, 8, 4
PROBE = torch.arange(3, 35).reshape(2, 16)


MOE = False  # --moe: a tiny Qwen3-MoE, whose experts blocks and routers are units too


def make_model(plus=False, keep=False):
    config = WeightLoraConfig(
        r=R, lora_alpha=8, target_modules="all-linear", selection_steps=T, plus=plus, reinit=not keep
    )
    return get_peft_model(tiny_qwen3_moe(seed=0) if MOE else tiny_llama(seed=0), config)


def shard(model, bf16=False):
    # bf16: FSDP2's mixed precision (bf16 all-gathered parameters and compute, fp32 gradient reduction and shards).
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)  # no ignored_params: in mask mode omega is not a model parameter


def refusals(out: Path) -> None:
    results = {}
    model = make_model()
    shard(model)
    try:
        WeightLoraModel(model, max_steps=STEPS, mask_mode=True)
    except ValueError as error:
        results["made_after_sharding"] = str(error)
    model = make_model()
    weight_lora = WeightLoraModel(model, max_steps=STEPS)  # module-swap mode (omega registered), then sharded
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model, ignored_params=set(weight_lora.omega_parameters()))
    try:
        weight_lora.switch()
    except RuntimeError as error:
        results["swap_mode_switch"] = str(error)
    torch.save(results, out / "refusals.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--plus", action="store_true")
    parser.add_argument("--keep", action="store_true", help="reinit=False")
    parser.add_argument("--no_shard", action="store_true", help="mask mode without FSDP (the reference)")
    parser.add_argument("--refusals", action="store_true")
    parser.add_argument("--skew_omega", action="store_true", help="rank 1 holds another omega at the switch")
    parser.add_argument("--checkpoint", help="save a DCP checkpoint and selection.json here after --stop_after steps")
    parser.add_argument("--stop_after", type=int, default=STEPS)
    parser.add_argument("--resume", help="continue from this checkpoint")
    parser.add_argument("--bf16_params", action="store_true", help="FSDP2 mixed precision: bf16 parameters")
    parser.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE instead of the Llama")
    args = parser.parse_args()
    global MOE
    MOE = args.moe
    out = Path(args.out)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.refusals:
        refusals(out)
        dist.destroy_process_group()
        return

    model = make_model(args.plus, args.keep)
    weight_lora = WeightLoraModel(model, max_steps=STEPS, mask_mode=True)
    if not args.no_shard:
        shard(model, bf16=args.bf16_params)
    sharded = [name for name, p in model.named_parameters() if is_sharded(p)]
    first_step = 1
    if args.resume:
        # The structure first (omega, or the switch's masks), then the optimizer on what trains now, then the weights
        # and the optimizer state from the checkpoint.
        report = read_selection(args.resume)
        weight_lora.restore(report)
        first_step = report.step + 1
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=1e-2)
    if args.resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    batches = torch.randint(3, 90, (STEPS, GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1))
    per_rank = GLOBAL_BATCH // world
    losses, record = {}, {}
    for step in range(first_step, args.stop_after + 1):
        batch = batches[step - 1, rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        weight_lora.omega_step()
        if step == T + 1:  # the first step after the switch: the dropped adapters got no gradient
            dropped = [a.module for a in weight_lora.adapters if not a.kept]
            record["dropped_with_grad"] = [
                name
                for name, p in model.named_parameters()
                if p.grad is not None and any(f"{module}.lora_" in name for module in dropped)
            ]
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses[step] = mean_loss.item() / world
        if step == T:
            record["omega"] = weight_lora.omega.clone()
            if args.skew_omega:
                if rank == 1:
                    weight_lora.set_omega(weight_lora.omega.flip(0))
                try:
                    weight_lora.switch(optimizer, seed=0)
                except RuntimeError as error:
                    torch.save({"error": str(error)}, out / f"skew{rank}.pt")
                dist.destroy_process_group()
                return
            weight_lora.switch(optimizer, seed=0)
            record["kept"] = [a.module for a in weight_lora.adapters if a.kept]
            record["optimizer_params"] = sum(len(group["params"]) for group in optimizer.param_groups)
            record["gates_left"] = sum("OmegaGated" in type(m).__name__ for m in model.modules())
            record["omega_in_state_dict"] = any("omega" in key for key in model.state_dict())
    if args.checkpoint:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=args.checkpoint)
        if rank == 0:
            write_selection(args.checkpoint, weight_lora.report(args.stop_after))
        torch.save({"losses": losses}, out / f"rank{rank}.pt")
        dist.destroy_process_group()
        return
    dropped = [a.module for a in weight_lora.adapters if not a.kept]
    record["dropped_nonzero"] = sum(
        int(torch.count_nonzero(p.full_tensor() if is_sharded(p) else p))
        for name, p in model.named_parameters()
        if any(f"{module}.lora_" in name for module in dropped)
    )
    with torch.no_grad():
        record["logits"] = model(input_ids=PROBE).logits.detach().clone()
    record["adapter"] = weight_lora.adapter_state_dict()  # gathered on every rank
    weight_lora.save_adapter(out / "adapter")
    record.update(losses=losses, world_size=world, sharded=len(sharded), omega_steps=weight_lora.omega_steps)
    torch.save(record, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
