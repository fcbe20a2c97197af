"""Selection sanity: adapters that provably cannot change the loss are not kept, wherever they sit by index.

In a layer whose `o_proj` weight is zero (and not adapted) the attention output is zero whatever q/k/v do, so
the q/k/v adapters of that layer get exactly zero gradient and their omega stays exactly 1. Live adapters move.
"""

import pytest
import torch

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # o_proj deliberately not adapted


def _run(tmp_path, dead_layers, k):
    model = tiny_llama(num_layers=4)
    for layer in dead_layers:
        model.model.layers[layer].self_attn.o_proj.weight.data.zero_()
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, k=k, selection_steps=6)
    trainer = WeightLoraTrainer(
        model, cpu_args(tmp_path, max_steps=8), train_dataset=addition_lm_dataset(), peft_config=cfg
    )
    trainer.train()
    names = trainer.weight_lora.module_names
    dead = {i for i, name in enumerate(names) if any(f"layers.{layer}.self_attn." in name for layer in dead_layers)}
    kept = [i for i, adapter in enumerate(trainer.weight_lora.adapters) if adapter.kept]
    omega = torch.tensor([adapter.omega for adapter in trainer.weight_lora.adapters])
    return dead, kept, omega


@pytest.mark.parametrize("dead_layers", [(0, 1), (2, 3), (1, 3)], ids=["dead_first", "dead_last", "dead_mixed"])
def test_dead_adapters_are_never_kept(tmp_path, dead_layers):
    live = 4 * len(TARGETS) - 3 * len(dead_layers)
    dead, kept, omega = _run(tmp_path, dead_layers, k=live // 4)
    assert len(dead) == 6 and len(kept) == live // 4
    assert not dead & set(kept)
    assert kept != list(range(len(kept)))  # not simply the first K by index
    assert torch.isin(omega[sorted(dead)], torch.tensor([0.0, 1.0])).all()  # dead omega never moved (or was zeroed)
    assert torch.all(omega[kept] > 1)  # kept ones grew: increasing their weight lowered the loss
