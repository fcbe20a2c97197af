"""Small before/after evaluations for the example scripts: greedy generation and a results table.

- `greedy_generate` renders chat prompts exactly as TRL does for training (the tokenizer's chat template with
  `add_generation_prompt=True`), left-pads them into batches of similar length and decodes greedily, so the
  same model gives the same text every time.
- `results_table` / `write_results` turn {"before": {...}, "after": {...}} metric dicts into a Markdown table
  (also printed by the scripts) and a JSON file.

These are sanity checks sized for a laptop, not benchmarks: for published numbers use lm-evaluation-harness on the
full test sets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence

import torch

RESULTS_JSON = "eval_results.json"
RESULTS_MARKDOWN = "eval_results.md"


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    conversations: Sequence[list[dict]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
    synced_processes: bool = False,
) -> list[str]:
    """The greedy continuation (special tokens removed) of each chat prompt, in input order.

    Prompts are sorted by length before batching so that left padding stays small; generation stops at the
    model's end-of-turn token(s) or after `max_new_tokens`. The model is put in eval mode for the call and returned
    to the mode it was in. `progress` shows a progress bar over the batches (generation can take minutes on CPU).
    `synced_processes`: the model is sharded over the processes (FSDP2), so every forward is collective: each
    process keeps stepping until all are done (`generate(synced_gpus=True)`); the caller gives every process the
    same number of prompts.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    prompts = [_prompt_ids(tokenizer, messages) for messages in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    # A fresh config: the model's own may carry sampling settings (temperature, top_p) that greedy decoding ignores
    # with a warning per call.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids if eos_ids is not None else tokenizer.eos_token_id,
        pad_token_id=pad_id,
        use_cache=True,  # training may have switched the cache off (gradient checkpointing)
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=f"Generating {len(prompts)} answers", unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: generation continues from the last column
                ids = prompts[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            with autocast():
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    synced_gpus=synced_processes,
                )
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs


def greedy_generate_across_processes(
    accelerator, model, tokenizer, conversations: Sequence[list[dict]], *, sharded: bool = False, **kwargs
) -> list[str]:
    """`greedy_generate` split over the processes of a multi-GPU run; every process gets every answer, in order.

    Process r answers conversations r, r + world, r + 2 world, ...; the answers are gathered with
    `accelerate.utils.gather_object`. (Generating on rank 0 alone left the other ranks waiting in the next
    collective, which long generations on a large model can hold past NCCL's timeout.)

    `sharded=True` (FSDP2): every forward all-gathers the layers' shards, so all processes must run the same
    forwards. Each process gets the same number of prompts (the short ones padded with a copy of the first prompt,
    whose answer is dropped), generates in step with the others (`synced_gpus`), and calls `generate` through the
    FSDP root so its own parameters (embeddings, final norm, head) are gathered too.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(conversations), world))
    prompts = [conversations[i] for i in mine]
    if sharded and conversations:
        prompts += [conversations[0]] * (math.ceil(len(conversations) / world) - len(mine))
        _register_generate_as_fsdp_forward(model)
    answers = greedy_generate(model, tokenizer, prompts, synced_processes=sharded, **kwargs)[: len(mine)]
    if world == 1:
        return answers
    from accelerate.utils import gather_object

    outputs = [""] * len(conversations)
    for index, answer in gather_object(list(zip(mine, answers))):
        outputs[index] = answer
    return outputs


def _register_generate_as_fsdp_forward(model: torch.nn.Module) -> None:
    """FSDP2 gathers a module's parameters around its `forward`; `generate` does not go through the root's forward
    (it calls the inner model's), so register it as a forward method: the root's shards are gathered for it. Once
    per model: registering wraps the method again each time, and the recipes generate before and after training.
    (torch's function is a no-op on a model that is not an FSDP module.)"""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if not getattr(model, "_wlora_generate_registered", False):
        register_fsdp_forward_method(model, "generate")
        model._wlora_generate_registered = True


# --- the before/after table ----------------------------------------------------------------------------------------


def _cell(metric: dict, value) -> str:
    if value is None:
        return "-"
    if metric.get("kind") == "fraction":
        count = f"{value['count']}/{value['total']} = " if isinstance(value, dict) else ""
        share = value["value"] if isinstance(value, dict) else value
        return f"{count}{100 * share:.1f}%"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(results: dict, metrics: Sequence[dict]) -> str:
    """A Markdown table, one row per metric, a column per phase present in `results` ("before", "after").

    `metrics` describes the rows: {"key": name in each phase's dict, "label": row label, "kind": "number" or
    "fraction"}. A fraction value is either a float in [0, 1] or {"value", "count", "total"}. Without any
    phase (every evaluation switched off) the "table" is a one-line note.
    """
    phases = [phase for phase in ("before", "after") if results.get(phase)]
    if not phases:
        return "(no evaluation was run)"
    lines = ["| metric | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for metric in metrics:
        cells = [_cell(metric, results[phase].get(metric["key"])) for phase in phases]
        lines.append(f"| {metric['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(value):
    # json.dump would write NaN/Infinity, which strict JSON readers reject; null says "not measured/not finite".
    return value if not isinstance(value, float) or math.isfinite(value) else None


def write_results(output_dir: str | os.PathLike, results: dict, table: str, title: str) -> tuple[str, str]:
    """Write `results` as eval_results.json and `table` (with `title`) as eval_results.md; returns both paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, RESULTS_JSON)
    markdown_path = os.path.join(output_dir, RESULTS_MARKDOWN)

    def clean(obj):
        if isinstance(obj, dict):
            return {key: clean(value) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(value) for value in obj]
        return _finite(obj)

    with open(json_path, "w") as f:
        json.dump(clean(results), f, indent=2)
        f.write("\n")
    with open(markdown_path, "w") as f:
        f.write(f"# {title}\n\n{table}\n")
    return json_path, markdown_path
