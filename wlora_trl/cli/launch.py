"""`wlora-trl sft`: run the SFT script under `accelerate launch`, the way `trl sft` runs TRL's scripts.

The script's own TrlParser decides which arguments are the script's (its dataclass fields, `--config`); whatever it
does not know, on the command line or as keys of the `--config` YAML, is an `accelerate launch` option
(`--num_processes 8`, `--mixed_precision bf16`, ...). `--accelerate_config NAME|PATH` picks one of the packaged
configs in `wlora_trl/cli/accelerate_configs/` (or any file) and becomes `--config_file`. The script is launched as a
module (`-m wlora_trl.recipes.sft`), so it runs from the installed package, with the original arguments including
`--config`, which it parses again in every process.
"""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path

SFT_MODULE = "wlora_trl.recipes.sft"
CONFIG_PACKAGE = "wlora_trl.cli"
CONFIG_FOLDER = "accelerate_configs"


def packaged_accelerate_configs() -> dict[str, Path]:
    """`{"single_gpu": <path>, "multi_gpu": ..., "single_gpu_8bit": ...}` as installed."""
    folder = resources.files(CONFIG_PACKAGE).joinpath(CONFIG_FOLDER)
    return {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".yaml")}


def accelerate_config_path(name_or_path: str) -> Path:
    """A config file path as given, else the packaged config of that name."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    configs = packaged_accelerate_configs()
    if name_or_path in configs:
        return configs[name_or_path]
    raise ValueError(
        f"accelerate config {name_or_path!r} is neither a file nor a packaged config; packaged: {', '.join(sorted(configs))}"
    )


def resolve_accelerate_config_argument(launch_args: list[str]) -> list[str]:
    """Turn `--accelerate_config NAME|PATH` into a leading `--config_file <path>`."""
    if "--accelerate_config" not in launch_args:
        return list(launch_args)
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("--accelerate_config needs a value: a packaged config name or a path")
    path = accelerate_config_path(launch_args[index + 1])
    return ["--config_file", str(path)] + launch_args[:index] + launch_args[index + 2 :]


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the ordered `subsequence` (argparse's leftovers keep their order in argv)."""
    rest, pending = [], iter(subsequence)
    current = next(pending, None)
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            rest.append(item)
    return rest


def split_sft_args(parser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch arguments, script arguments) of `wlora-trl sft <argv>`, decided by the script's parser.

    The parser is a TrlParser; `--help` prints the script's help and exits here, before anything launches.
    """
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    return launch_args, _subtract_subsequence(list(argv), cli_remaining)


def sft_launch_argv(parser, argv: list[str], module: str = SFT_MODULE) -> list[str]:
    """The arguments of `accelerate launch` for `wlora-trl sft <argv>`."""
    launch_args, script_args = split_sft_args(parser, argv)
    return launch_args + ["-m", module] + script_args


def run_sft(argv: list[str], script_flags: tuple[str, ...] = (), prog: str = "wlora-trl sft") -> int:
    """Parse with the SFT script's parser, then hand over to `accelerate launch`. `script_flags` are added to the
    script's own (`wlora-trl select` is `wlora-trl sft --select_only true`)."""
    import importlib

    try:
        # Imported here, not at the top: it pulls in TRL's trainers, which the other subcommands do not need.
        sft = importlib.import_module(SFT_MODULE)
    except ImportError as err:
        raise SystemExit(
            f"wlora-trl sft: the SFT script {SFT_MODULE} is not available in this installation: {err}"
        ) from err
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = sft.make_parser()
    parser.prog = prog
    launch_argv = sft_launch_argv(parser, [*argv, *script_flags])
    try:
        launch_command(launch_command_parser().parse_args(launch_argv))
    except subprocess.CalledProcessError as error:
        # The script already said what went wrong; accelerate's own traceback would only bury it.
        return error.returncode
    return 0
