"""Every private internal `wlora_trl._compat` relies on, checked against the installed accelerate/torch/transformers.

When an upgrade moves one of them, this file fails and names it, instead of a multi-GPU run going wrong quietly.
"""

from __future__ import annotations

import gc
import inspect
import weakref

import pytest
import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from tests.testing_utils import tiny_llama
from wlora_trl import _compat


@pytest.fixture
def single_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's state is a process-wide singleton: start from a clean one and leave a clean one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerator_internals(fresh_accelerator_state):
    accelerator = Accelerator(cpu=True)
    assert isinstance(accelerator._models, list)
    assert hasattr(accelerator, "ddp_handler")
    assert isinstance(accelerator.gradient_state.plugin_kwargs, dict)
    assert _compat.sync_each_batch(accelerator) is False
    # prepare_model builds DDP by looking the class up at call time (what ddp_without_initial_broadcast swaps).
    assert "torch.nn.parallel.DistributedDataParallel(" in inspect.getsource(Accelerator.prepare_model)


def test_evaluation_prepare_marks_the_bare_model_and_can_be_undone(fresh_accelerator_state):
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = tiny_llama()
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    assert prepared is model and model._is_accelerate_prepared and "_original_forward" in model.__dict__
    assert _compat.undo_evaluation_prepare(accelerator, model)
    assert not hasattr(model, "_is_accelerate_prepared") and "forward" not in model.__dict__
    assert all(m is not model for m in accelerator._models)


def test_ddp_internals_and_release(single_process_group):
    assert "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters
    model = torch.nn.Linear(4, 4)
    ddp = DistributedDataParallel(model)
    assert all(hasattr(ddp, name) for name in ("_accum_grad_hooks", "_module_parameters", "reducer", "logger"))
    with _compat.ddp_without_initial_broadcast():
        rebuilt = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    assert (
        type(rebuilt) is DistributedDataParallel
        and torch.nn.parallel.DistributedDataParallel is DistributedDataParallel
    )
    # After release, the wrapper no longer keeps the parameters it was built with alive.
    inner = torch.nn.Linear(4, 4)
    ddp = DistributedDataParallel(inner)
    ref = weakref.ref(inner.weight)
    ddp.module = torch.nn.Identity()  # what the trainer's stale wrapper amounts to: the old tensors replaced
    del inner
    _compat.release_ddp(ddp)
    gc.collect()
    assert ref() is None


def test_grad_scaler_scale_without_sync():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # initialises the scale tensor
    scale = _compat.loss_scale(scaler)
    assert torch.is_tensor(scale) and float(scale) == 2.0**10


def test_trainer_loop_layout():
    """The epoch loop keeps the wrapped model in a local variable and hands it to training_step and the gradient
    clipping; the trainer swaps in the re-wrapped model inside training_step (see _compat's closing comment)."""
    loop = inspect.getsource(Trainer._inner_training_loop) + inspect.getsource(Trainer._run_epoch)
    assert "self.training_step(model, inputs" in loop and "self._clip_grad_norm(model)" in loop
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters)[1:] == ["resume_from_checkpoint", "model"]
