"""The four benchmark tasks as lm-eval task folders, on local data files or on the hub.

The task definitions are YAML templates shipped inside the package (`wlora_trl/evaluation/task_templates/`), so that an installed
`wlora-trl` finds them without a repository checkout. Each template `include`s lm-eval's stock task by absolute path
and overrides only the data source; prompts, filters and metrics stay lm-eval's own. lm-eval resolves an `include`
relative to the including file unless it is absolute, and `dataset_kwargs.data_files` relative to the working
directory, so both paths are filled in at run time and the result is written to a fresh folder that lm-eval reads with
`TaskManager(include_path=..., include_defaults=False)`. Skipping lm-eval's own index of ~15k stock tasks saves ~30 s
per run; online, the rendered file is the bare `include` of the stock task, i.e. the stock task unchanged.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from .._offline.data import DATA_DIR_ENV

TEMPLATE_FOLDER = "task_templates"  # inside wlora_trl.evaluation, shipped as package data
TASKS = ("gsm8k", "hellaswag", "boolq", "arc_challenge")


class TaskInputError(ValueError):
    """A task name or a data file that cannot be used; raised before any model loads."""


def lm_eval_tasks_dir() -> Path:
    """lm-eval's stock task folder (`lm_eval/tasks`), where the templates' `include`s point."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def parse_tasks(spec: str | list[str]) -> list[str]:
    """`"gsm8k,boolq"` -> `["gsm8k", "boolq"]`, refusing names that have no template."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise TaskInputError(f"no task given; valid tasks: {', '.join(TASKS)}")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise TaskInputError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _template(task: str) -> dict:
    # Anchored at wlora_trl.evaluation: task_templates/ is a data folder, not a package (no __init__.py).
    text = resources.files("wlora_trl.evaluation").joinpath(TEMPLATE_FOLDER).joinpath(f"{task}.yaml").read_text()
    return yaml.safe_load(text)


@dataclass(frozen=True)
class DataNeed:
    """One local file a task reads: `<data_dir>/<relative>`, used as split `split`."""

    task: str
    split: str
    relative: str

    def path(self, data_dir: Path) -> Path:
        return data_dir / self.relative


def data_needs(task: str) -> list[DataNeed]:
    """The local files a task's template reads, from its `dataset_kwargs.data_files`."""
    files = _template(task)["dataset_kwargs"]["data_files"]
    prefix = "${DATA_DIR}/"
    return [DataNeed(task, split, value.removeprefix(prefix)) for split, value in files.items()]


def _stock_config(task: str) -> dict:
    """lm-eval's own config of the task (the template's include, includes resolved, functions left unresolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    include = string.Template(_template(task)["include"]).substitute(LM_EVAL_TASKS=lm_eval_tasks_dir())
    return load_yaml(include, resolve_func=False)


def stock_source(task: str) -> str:
    """`dataset_path[/dataset_name]` of lm-eval's stock task, to say which hub dataset a local file mirrors."""
    stock = _stock_config(task)
    return "/".join(str(part) for part in (stock.get("dataset_path"), stock.get("dataset_name")) if part)


def check_local_data(tasks: list[str], data_dir: Path, num_fewshot: int | None) -> None:
    """Every file the tasks read exists, and holds enough rows for the few-shot examples drawn from it."""
    problems = []
    for task in tasks:
        needs = data_needs(task)
        for need in needs:
            path = need.path(data_dir)
            if not path.is_file():
                problems.append(
                    f"{task}: {path} is missing; put the {need.split} split of the hub dataset {stock_source(task)} "
                    "there, one JSON object per line in the hub's field layout (see eval/README.md)"
                )
        shots = int(_stock_config(task).get("num_fewshot") or 0) if num_fewshot is None else num_fewshot
        # lm-eval draws few-shot examples from train, else from validation (our templates always have one of them),
        # and with too few rows it fails deep inside the run, after the model has loaded. One spare row, because from
        # the evaluated split itself lm-eval leaves the document under evaluation out.
        source = next(n for n in needs if n.split in ("train", "validation"))
        if shots and source.path(data_dir).is_file():
            rows = _count_rows(source.path(data_dir), stop=shots + 1)
            if rows < shots + 1:
                problems.append(
                    f"{task}: {shots}-shot needs {shots + 1} rows in {source.path(data_dir)}, it has {rows}"
                )
    if problems:
        where = f"data folder {data_dir} (from --data_dir, ${DATA_DIR_ENV}, or shared/data above the current directory)"
        raise TaskInputError(f"local data for {where} is incomplete:\n  " + "\n  ".join(problems))


def _count_rows(path: Path, stop: int) -> int:
    rows = 0
    with open(path) as f:
        for line in f:
            rows += bool(line.strip())
            if rows >= stop:
                break
    return rows


def _substitute(node, mapping: dict[str, str]):
    if isinstance(node, str):
        return string.Template(node).substitute(mapping)
    if isinstance(node, dict):
        return {key: _substitute(value, mapping) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, mapping) for value in node]
    return node


def render_task(task: str, data_dir: Path | None) -> dict:
    """The task's lm-eval config: local overrides with absolute paths, or (data_dir None) the bare stock include."""
    config = _template(task)
    if data_dir is None:
        config = {"task": config["task"], "include": config["include"]}
    mapping = {"LM_EVAL_TASKS": str(lm_eval_tasks_dir()), "DATA_DIR": str(Path(data_dir).resolve()) if data_dir else ""}
    return _substitute(config, mapping)


def write_task_folder(tasks: list[str], data_dir: Path | None, out_dir: str | os.PathLike) -> Path:
    """Write one `<task>.yaml` per task into `out_dir` and check that lm-eval can read each of them."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = f"local files under {Path(data_dir).resolve()}" if data_dir else "the hub (lm-eval's stock task)"
    for task in tasks:
        path = out / f"{task}.yaml"
        header = f"# Generated by wlora_trl from wlora_trl/{TEMPLATE_FOLDER}/{task}.yaml; data from {source}.\n"
        path.write_text(header + yaml.safe_dump(render_task(task, data_dir), sort_keys=False))
        # lm-eval's task index skips a file it cannot parse with a debug-level log only, which would surface much
        # later as "task not found"; loading it here turns a broken include into an error naming the file.
        merged = load_yaml(path, resolve_func=False)
        if merged.get("task") != task or "output_type" not in merged:
            raise TaskInputError(f"{path} does not resolve to lm-eval's {task} task (include broken?)")
    return out


def task_manager(task_dir: Path):
    """An lm-eval TaskManager that knows only the rendered tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)
