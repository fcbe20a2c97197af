"""AdaLoRA and EVA, stock PEFT's adaptive-rank peers of WeightLoRA, run by the recipes at WeightLoRA's budget.

Both recipes (`sft`, `classify`) take `--method adalora` and `--method eva`; this module builds their PEFT configs,
does what the stock `Trainer` does not (AdaLoRA's per-step `update_and_allocate`, EVA's data-driven initialisation
before training) and reports the ranks each method ends with.

How budgets are matched (every method counted in ranks, the unit all of them budget in):
- LoRA: rank r on each of the n target modules: n*r ranks.
- WeightLoRA: K = k*n adapters kept at rank r after the warm-up: k*n*r ranks (k = 0.5: half of LoRA's).
- AdaLoRA (`AdaLoraConfig`): starts at `init_r = r` on every module, LoRA's structure, as WeightLoRA's warm-up
  does, and prunes by its importance scores to an average `target_r = k*r` (4 at r = 8, k = 0.5): the same k*n*r
  ranks at the end, spread freely over the modules (at most r each, as WeightLoRA's kept adapters have).
- EVA (`LoraConfig(init_lora_weights="eva")`): rank `k*r` per module (its budget is `n * r_eva` ranks in all) with
  `rho = 1/k` (2 at k = 0.5, which is also PEFT's default), so that no module gets more than r: the explained-variance
  redistribution chooses among the same allocations as WeightLoRA and AdaLoRA, WeightLoRA's own (rank r on K modules,
  0 elsewhere) included.
- Every method keeps LoRA's alpha/r: AdaLoRA scales by alpha/init_r, EVA gets alpha*k so that alpha/r_eva is LoRA's
  (EVA's `adjust_scaling_factors` then keeps that ratio for redistributed ranks), WeightLoRA+ doubles alpha with r.
Equal ranks are not exactly equal parameters: a rank costs in+out parameters (plus one singular value for AdaLoRA),
and the methods may favour different module shapes, so the recipes report the parameters each run ends with (the
saved adapter) and the most it trained at once (AdaLoRA trains its init_r triplets throughout, masked; WeightLoRA
trains all n adapters during its T warm-up steps).

AdaLoRA's schedule follows its paper's GLUE settings in proportion: `tinit` = 10% of the steps at the initial budget,
the budget then shrinks cubically, and the last `tfinal` = 30% train the final ranks; `deltaT = 1` (PEFT's default),
`orth_reg_weight = 0.5` and the EMA betas are PEFT's defaults; the recipes' evaluation losses leave the regulariser
out (`task_loss_only`), so they compare with the other methods'. The ranks are allocated from gradients, so
`update_and_allocate(global_step)` runs in `on_optimizer_step` (after `optimizer.step()`, before `zero_grad`), with
the 0-based index of the step just taken, as PEFT's own training loop example does. Its importance estimates are not
checkpointed: a resumed run re-estimates them from the resume point.

EVA runs `initialize_lora_eva_weights` before training on the training data in a shuffled order drawn from its own
generator (seeded with `data_seed`, else `seed`), so the data order of training is the same as every other method's;
the label mask is used for causal LMs (prompt tokens are -100) and not for sequence classification (one label per
row). Modules it gives rank 0 are removed.

Neither runs under FSDP2 here (AdaLoRA's allocator and EVA's hooks read whole parameters); both refuse WeightLoRA's
`--plus` and `--reinit false`, which have no meaning for them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

from transformers import TrainerCallback

from ..engines.fsdp2 import is_fsdp2
from .flags import config_number

logger = logging.getLogger(__name__)

PEER_METHODS = ("adalora", "eva")
ADALORA_TINIT = "0.1"
ADALORA_TFINAL = "0.3"


@dataclass
class PeerArguments:
    """The flags of the two peers; left unset, each takes the value that matches WeightLoRA's budget (module doc)."""

    adalora_init_r: int | None = field(
        default=None, metadata={"help": "AdaLoRA's initial rank per module. Default: --lora_r (LoRA's structure)."}
    )
    adalora_target_r: int | None = field(
        default=None,
        metadata={"help": "AdaLoRA's final average rank. Default: k * --lora_r (WeightLoRA's rank budget)."},
    )
    adalora_tinit: str = field(
        default=ADALORA_TINIT,
        metadata={"help": "AdaLoRA's steps at the initial budget: a count, or a fraction of --max_steps."},
    )
    adalora_tfinal: str = field(
        default=ADALORA_TFINAL,
        metadata={"help": "AdaLoRA's last steps with the final ranks fixed: a count, or a fraction of --max_steps."},
    )
    adalora_delta_t: int = field(default=1, metadata={"help": "AdaLoRA's steps between two rank allocations."})
    eva_r: int | None = field(
        default=None, metadata={"help": "EVA's rank per module before redistribution. Default: k * --lora_r."}
    )
    eva_rho: float | None = field(
        default=None,
        metadata={"help": "EVA's redistribution limit (a module gets at most eva_r * rho). Default: 1/k."},
    )


def _fraction(k: int | float, name: str = "k") -> float:
    if isinstance(k, bool) or not isinstance(k, float) or not 0 < k <= 1:
        raise ValueError(
            f"--{name} {k!r}: AdaLoRA and EVA are matched to WeightLoRA's budget as a share of LoRA's ranks, so pass "
            "k as a fraction in (0, 1], e.g. --k 0.5 (the default)."
        )
    return k


def _matched_rank(r: int, k: float, what: str) -> int:
    rank = round(r * k)
    if rank < 1:
        raise ValueError(f"{what}: k * r = {k} * {r} rounds to 0 ranks. Raise --lora_r or --k.")
    if not math.isclose(rank, r * k):
        logger.warning(
            "%s: k * r = %g is not a whole rank; using %d (the budgets then differ slightly).", what, r * k, rank
        )
    return rank


def _scaled(alpha: float, rank: int, r: int) -> int | float:
    """alpha * rank / r, an int when it is whole (as LoRA configs write alpha)."""
    value = alpha * rank / r
    return int(value) if float(value).is_integer() else value


def _steps(value: str | int | float, max_steps: int, name: str) -> int:
    number = config_number(value, name)
    if isinstance(number, float):
        if not 0 <= number < 1:
            raise ValueError(f"--{name} {value!r}: a fraction of --max_steps must be in [0, 1).")
        return round(number * max_steps)
    if number < 0:
        raise ValueError(f"--{name} {value!r}: a step count must be >= 0.")
    return number


def check_peer_flags(args) -> None:
    """Refuse WeightLoRA-only flags with a peer method, before anything loads."""
    if args.method not in PEER_METHODS:
        return
    if args.plus:
        raise ValueError(
            f"--plus is WeightLoRA+; --method {args.method} has no such variant. Drop --plus (the peers run at "
            "WeightLoRA's budget, k * LoRA's ranks)."
        )
    if not args.reinit:
        raise ValueError(
            f"--reinit false is WeightLoRA's (keep the warm-up's adapters); --method {args.method} has none."
        )


def adalora_config(args, max_steps: int, **lora_fields):
    """`AdaLoraConfig` at WeightLoRA's budget: init_r = r, target_r = k*r, tinit/tfinal from --max_steps."""
    from peft import AdaLoraConfig

    if max_steps is None or max_steps <= 0:
        raise ValueError(
            "--method adalora schedules its rank budget over a known number of steps: pass --max_steps (> 0)."
        )
    k = _fraction(config_number(args.k, "k"))
    r = lora_fields.pop("r")
    init_r = args.adalora_init_r or r
    target_r = args.adalora_target_r or _matched_rank(r, k, "AdaLoRA's target_r")
    if not 1 <= target_r < init_r:
        raise ValueError(
            f"AdaLoRA needs 1 <= target_r < init_r to prune anything; got target_r {target_r}, init_r {init_r}. "
            "Lower --k (or --adalora_target_r), or raise --adalora_init_r."
        )
    tinit = _steps(args.adalora_tinit, max_steps, "adalora_tinit")
    tfinal = _steps(args.adalora_tfinal, max_steps, "adalora_tfinal")
    if tinit + tfinal >= max_steps:
        raise ValueError(
            f"AdaLoRA's tinit ({tinit}) + tfinal ({tfinal}) steps leave no budgeting phase in --max_steps {max_steps}. "
            "Lower --adalora_tinit / --adalora_tfinal or raise --max_steps."
        )
    if lora_fields.pop("use_dora", False):
        raise ValueError("--method adalora cannot use DoRA: drop --use_dora.")
    lora_fields.pop("use_rslora", None)  # AdaLoRA scales by alpha / init_r; it has no rsLoRA variant
    # alpha/init_r is LoRA's alpha/r when init_r = r; an explicit init_r keeps that ratio too.
    lora_fields["lora_alpha"] = _scaled(lora_fields["lora_alpha"], init_r, r)
    return AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=args.adalora_delta_t,
        total_step=max_steps,
        **lora_fields,
    )


def eva_config(args, **lora_fields):
    """`LoraConfig(init_lora_weights="eva")` at WeightLoRA's budget: r_eva = k*r, rho = 1/k, LoRA's alpha/r."""
    from peft import EvaConfig, LoraConfig

    k = _fraction(config_number(args.k, "k"))
    r = lora_fields["r"]
    eva_r = args.eva_r or _matched_rank(r, k, "EVA's rank")
    rho = args.eva_rho if args.eva_rho is not None else 1 / k
    if rho < 1:
        raise ValueError(f"--eva_rho {rho}: EVA needs rho >= 1 (1: no redistribution).")
    lora_fields.update(r=eva_r, lora_alpha=_scaled(lora_fields["lora_alpha"], eva_r, r))
    # Causal LMs mark prompt tokens -100 in their token labels; a classifier has one label per row, not per token.
    use_label_mask = lora_fields.get("task_type") == "CAUSAL_LM"
    return LoraConfig(
        init_lora_weights="eva", eva_config=EvaConfig(rho=rho, use_label_mask=use_label_mask), **lora_fields
    )


def peer_config(args, max_steps: int | None, **lora_fields):
    if args.method == "adalora":
        return adalora_config(args, max_steps, **lora_fields)
    return eva_config(args, **lora_fields)


# --- during training ----------------------------------------------------------------------------------------------


def _lora_e(model):
    """(module name in the transformers model, its lora_E parameter) of every AdaLoRA layer."""
    for name, module in model.base_model.model.named_modules():
        e = getattr(module, "lora_E", None)
        if e is not None and "default" in e:
            yield name, e["default"]


class AdaLoraAllocation(TrainerCallback):
    """Runs AdaLoRA's rank allocation after every optimizer step (the stock Trainer never calls it, so without this
    AdaLoRA silently trains as a fixed-rank SVD-LoRA) and keeps the budget's history: [step, active ranks] each time
    the number of ranks left changes."""

    def __init__(self) -> None:
        self.history: list[list[int]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = model.peft_config["default"]
        if config.total_step != state.max_steps:
            raise ValueError(
                f"AdaLoRA's total_step ({config.total_step}) is not this run's {state.max_steps} steps: its budget "
                "schedule would end early or never. Build its config with the run's --max_steps."
            )
        if not self.history:
            self.history.append([state.global_step, active_ranks(model)])

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)
        active = active_ranks(model)
        if active != self.history[-1][1]:
            self.history.append([state.global_step + 1, active])


def active_ranks(model) -> int:
    """Ranks AdaLoRA keeps now: its rank pattern's once it has masked, else every triplet."""
    pattern = model.peft_config["default"].rank_pattern
    if pattern:
        return int(sum(sum(mask) for mask in pattern.values()))
    return int(sum(e.numel() for _, e in _lora_e(model)))


@contextlib.contextmanager
def task_loss_only(model):
    """Within the block, AdaLoRA's loss is the task's alone: PEFT adds its orthogonal regulariser to the loss of every
    forward that has labels, evaluation included, which would make its held-out loss incomparable with the other
    methods'. A no-op for every other model."""
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get("default")
    weight = getattr(config, "orth_reg_weight", None)
    if weight is None:
        yield
        return
    config.orth_reg_weight = 0.0
    try:
        yield
    finally:
        config.orth_reg_weight = weight


def _batches_for_eva(trainer):
    """The training data in a shuffled order from EVA's own generator (the Trainer's order is untouched), collated
    as for training, keys limited to what the model's forward takes."""
    import inspect

    import torch
    from torch.utils.data import DataLoader

    args = trainer.args
    generator = torch.Generator().manual_seed(args.data_seed if args.data_seed is not None else args.seed)
    forward = trainer.model.get_base_model().forward
    accepted = set(inspect.signature(forward).parameters)

    def collate(rows):
        batch = trainer.data_collator(rows)
        return {key: value for key, value in batch.items() if key in accepted and torch.is_tensor(value)}

    return DataLoader(
        trainer.train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
    )


def initialize_eva(trainer) -> None:
    """EVA's SVD initialisation of A (and its rank redistribution) on the training data, before training starts."""
    import time

    from peft import initialize_lora_eva_weights

    # Tens of seconds before the first training step: say what is happening, and when it is done.
    trainer.accelerator.print("EVA: initialising the adapters from the SVD of their inputs on the training data ...")
    start = time.perf_counter()
    initialize_lora_eva_weights(
        trainer.model,
        _batches_for_eva(trainer),
        gather_distributed_inputs=False,  # every process reads the same batches, so each computes the same SVD
        show_progress_bar=not trainer.args.disable_tqdm,
    )
    trainer.accelerator.print(f"EVA: initialised in {time.perf_counter() - start:.0f} s; training starts.")


@dataclass
class PeerRun:
    """What a peer method did in one run: its method, the adapted modules it started with, AdaLoRA's callback."""

    method: str
    targets: list[str]
    allocation: AdaLoraAllocation | None = None

    def final_ranks(self, model) -> dict[str, int]:
        """{module: rank it ends with} over the modules it started with (0: pruned or removed)."""
        if self.method == "adalora":
            pattern = model.peft_config["default"].rank_pattern or {}
            ranks = {name: e.numel() for name, e in _lora_e(model)}
            for key, mask in pattern.items():
                ranks[_module_of(key)] = int(sum(mask))
            return {name: ranks.get(name, 0) for name in self.targets}
        present = lora_ranks(model)
        return {name: present.get(name, 0) for name in self.targets}

    def summary(self, model) -> dict:
        ranks = self.final_ranks(model)
        config = model.peft_config["default"]
        summary = {
            "method": self.method,
            "final_ranks": ranks,
            "total_rank": sum(ranks.values()),
            "kept_modules": sorted(name for name, rank in ranks.items() if rank > 0),
        }
        if self.method == "adalora":
            summary.update(
                init_r=config.init_r,
                target_r=config.target_r,
                tinit=config.tinit,
                tfinal=config.tfinal,
                budget_history=self.allocation.history if self.allocation else None,
            )
        else:
            summary.update(eva_r=config.r, rho=config.eva_config.rho)
        return summary


def _module_of(rank_pattern_key: str) -> str:
    # "bert.encoder.layer.0.attention.self.query.lora_E.default" (".default" is dropped once the adapter is saved)
    return rank_pattern_key.split(".lora_E")[0]


def lora_ranks(model) -> dict[str, int]:
    """{module name in the transformers model: rank} of the LoRA layers the PeftModel holds now."""
    return {name: module.r["default"] for name, module in _lora_layers(model)}


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            yield name, module


def prepare(trainer, method: str) -> PeerRun:
    """What the stock trainer needs for `method`, on the PeftModel it holds: AdaLoRA's allocation callback, or EVA's
    initialisation (run now). Returns the `PeerRun` to summarise the run with."""
    if is_fsdp2(trainer):
        raise ValueError(
            f"--method {method} is not supported under FSDP2 by the recipes; run it in one process or DDP."
        )
    targets = [name for name, _ in _lora_layers(trainer.model)]
    if method == "adalora":
        allocation = AdaLoraAllocation()
        trainer.add_callback(allocation)
        return PeerRun(method, targets, allocation)
    initialize_eva(trainer)
    return PeerRun(method, targets)
