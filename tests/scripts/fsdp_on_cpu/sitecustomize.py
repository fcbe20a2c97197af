"""Test-only: let accelerate keep its FSDP plugin in CPU processes (gloo), as it does on GPUs.

accelerate turns `distributed_type: FSDP` into FSDP only on accelerators: on a CPU its state stays MULTI_CPU and the
FSDP plugin is dropped (`AcceleratorState.__init__`). `enable_fsdp_on_cpu` makes that one decision the other way,
and nothing else: accelerate's own `fsdp2_prepare_model` then shards the model (`fully_shard` per decoder layer,
gloo), loads it from rank 0, writes DCP checkpoints and applies its mixed precision policy.

Put this folder on PYTHONPATH with WLORA_TEST_FSDP_ON_CPU=1 and every Python process started under it (the
`accelerate launch` workers of a recipe too) applies it at startup; scripts can also call `enable_fsdp_on_cpu()`.
"""

import os


def enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What AcceleratorState does for MULTI_GPU when an FSDP plugin is given.
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as __init__ ends

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


if os.environ.get("WLORA_TEST_FSDP_ON_CPU") == "1" and os.environ.get("LOCAL_RANK") is not None:
    enable_fsdp_on_cpu()  # only in launched workers: the launcher itself needs no accelerate state
