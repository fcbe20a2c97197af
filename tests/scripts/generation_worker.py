"""Greedy generation split over processes; each rank saves what it got. Launched by tests/recipes/test_quick_eval.py:

python -m torch.distributed.run --nproc_per_node 2 generation_worker.py OUT
"""

import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.recipes.test_quick_eval import CONVERSATIONS, chat_setup  # noqa: E402
from wlora_trl.recipes.quick_eval import greedy_generate_across_processes  # noqa: E402


def main() -> None:
    accelerator = Accelerator(cpu=True)
    model, tokenizer = chat_setup()
    answers = greedy_generate_across_processes(
        accelerator, model, tokenizer, CONVERSATIONS, max_new_tokens=8, batch_size=2, progress=False
    )
    torch.save(
        {"answers": answers, "world": accelerator.num_processes},
        os.path.join(sys.argv[1], f"rank{accelerator.process_index}.pt"),
    )


if __name__ == "__main__":
    main()
