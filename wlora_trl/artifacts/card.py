"""The adapter's model card (`README.md`): what WeightLoRA selected, how to load the adapter, how to cite the method.

Written by the trainers with every save (`save_model` and checkpoints) in place of PEFT's empty template, so a folder
pushed to the hub explains itself. Built from the selection report alone (no model needed), in Markdown with the hub's
YAML header (`base_model`, `library_name: peft`, tags).
"""

from __future__ import annotations

import os

from ..config import CITATION
from ..state import SelectionReport, kept_by_projection

CARD_FILE = "README.md"
PAPER_URL = "https://arxiv.org/abs/2506.02724"


# PEFT task type -> the transformers Auto class that loads the base with the head the adapter was trained on.
AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def model_card(
    report: SelectionReport,
    base_model: str | None,
    heatmap: str | None = None,
    task: str | None = None,
    trainer_tags: list[str] | tuple[str, ...] = ("weightlora",),
) -> str:
    """The card as Markdown. `heatmap`: the selection heatmap's file name beside it, if there is one; `trainer_tags`:
    the trainer's `_tag_names` (TRL's convention), after `peft` and `lora`."""
    base = base_model or "the base model"
    kept = [a for a in report.adapters if a.kept]
    ranks = sorted({a.rank for a in kept}) or sorted({a.rank for a in report.adapters})
    rank = ranks[0] if len(ranks) == 1 else max(ranks)
    known_shapes = all(a.shape_known for a in report.adapters)
    experts = [a for a in report.adapters if a.kind == "experts"]
    tags = list(dict.fromkeys(["peft", "lora", "weightlora", *trainer_tags]))
    auto_class = AUTO_CLASSES.get(task, "AutoModel")
    lines = [
        "---",
        *([f"base_model: {base_model}"] if base_model else []),
        "library_name: peft",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
        f"# WeightLoRA adapter for {base}",
        "",
        f"A LoRA adapter trained with **{report.method}** ([Veprikov et al., ACL 2026]({PAPER_URL})), which lets "
        "training decide where the adapters go: every LoRA adapter gets a scalar weight ω, trained for a short "
        "warm-up by StoIHT (an SGD step, then keep the K entries of largest |ω|); the adapters at ω = 0 are then "
        "removed and training continues as plain LoRA on the kept ones. The files are a stock PEFT LoRA adapter: "
        "nothing of WeightLoRA is needed to load or serve them.",
        "",
        "## The selection",
        "",
        "| | |",
        "|---|---|",
        f"| method | {report.method} |",
        f"| adapters considered (n) | {report.n} |",
        f"| kept (K) | {report.k} |",
    ]
    if report.selection_only:
        lines.append(
            f"| state | **selection only** (`wlora-trl select` / `select_adapters()`): saved at the switch after T = "
            f"{report.selection_steps} steps; " + ("the kept adapters were re-initialised (B = 0), so these weights "
            "change nothing: use the folder for its selection, `wlora_trl.lora_config_from_selection(folder)` |"
            if report.reinit else "the weights are the warm-up's, omega folded in |")
        )  # fmt: skip
    if report.switched:
        lines.append(
            f"| warm-up (T) | {report.selection_steps} optimizer steps; the switch opened step {report.switch_step} |"
        )
        lines.append(f"| rank after the switch | {', '.join(map(str, ranks))} |")
    else:
        lines.append(f"| state | saved during the warm-up, at step {report.step} (T = {report.selection_steps}): ω is "
                     "folded into each `lora_B`, so the files are the model as it was |")  # fmt: skip
    if report.method != "random":
        lines.append(f"| omega_lr | {report.omega_lr} |")
    lines.append(f"| kept per projection | {kept_by_projection(report)} |")
    if known_shapes and report.switched:
        trainable = sum(a.numel() for a in kept)
        lora_rank = rank // 2 if report.method == "WeightLoRA+" else rank
        lora = sum(a.numel(lora_rank) for a in report.adapters)
        lines.append(f"| trainable parameters | {trainable:,} ({100 * trainable / lora:.0f}% of LoRA rank {lora_rank} on all "
                     f"n: {lora:,}) |")  # fmt: skip
    if experts:
        lines.append(f"| experts blocks kept | {sum(a.kept for a in experts)} of {len(experts)} (each block: the "
                     f"{experts[0].num_experts} experts' {' and '.join(experts[0].parameters)}, kept or dropped "
                     "together) |")  # fmt: skip
    lines.append("")
    if heatmap:
        lines += [f"![The selection: layers x projections, colour = final ω, kept outlined]({heatmap})", ""]
    lines += [
        "`selection.json` beside the weights records every adapter: module, final ω, kept or not, rank.",
        "",
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f'base = {auto_class}.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        "```",
        "",
        f"- lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={base},peft=path/to/this/adapter --tasks ...`",
        f"- vLLM: `LLM(model=\"{base}\", enable_lora=True, max_lora_rank={rank})` and "
        '`LoRARequest("weightlora", 1, "path/to/this/adapter")`; vLLM and llama.cpp take adapters on a subset of '
        "layers as they are."
        + (
            " The experts adapters are PEFT `target_parameters` (LoRA on the 3-D expert weights): vLLM loads them "
            "with its MoE LoRA support (recent releases), which needs gate_up_proj and down_proj of a block together "
            "(so WeightLoRA keeps or drops them together)."
            if experts
            else ""
        ),
        "- TGI / LoRAX (and SGLang before it accepted missing projections) want every projection type in every "
        "layer: export a padded copy first, `wlora-trl export --padded THIS_FOLDER PADDED_FOLDER` (zeros where an "
        "adapter was dropped; the same function).",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


_FIND_HEATMAP = object()


def write_model_card(directory: str | os.PathLike, report: SelectionReport, base_model: str | None,
                     task: str | None = None, trainer_tags: list[str] | tuple[str, ...] = ("weightlora",),
                     heatmap: str | None | object = _FIND_HEATMAP) -> str:  # fmt: skip
    """Write `README.md` into `directory`, linking `heatmap` (a file name in it; by default the heatmap if one is
    there); returns its path."""
    if heatmap is _FIND_HEATMAP:
        from .plotting import HEATMAP_FILE

        heatmap = HEATMAP_FILE if os.path.isfile(os.path.join(directory, HEATMAP_FILE)) else None
    path = os.path.join(directory, CARD_FILE)
    with open(path, "w") as f:
        f.write(model_card(report, base_model, heatmap, task, trainer_tags))
    return path
