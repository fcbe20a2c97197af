"""`selection.json`: the record of what WeightLoRA selected, next to every saved adapter and checkpoint.

It is the run's transparency report (n, K, T, every adapter's module, final omega, kept or not, rank after the
switch) and the state a checkpoint resumes from: omega's fp32 values survive the JSON round trip exactly (a zero is
written as 0.0, never -0.0).
`SelectionReport` / `AdapterRecord` are its one typed form; `write_selection` / `read_selection` its only writer and
reader, which refuses a record that contradicts itself (`check_selection`) or, asked to, the adapter weights beside
it (`check_adapter_weights`). Format versions: 1 added `format_version`, `wlora_trl_version` and `omega_steps`; 2
adds each adapter's `in_features` / `out_features` (what a report or a padded export needs without the base model);
3 adds units on parameters (experts blocks and routers of mixture-of-experts models: `kind`, `num_experts`,
`parameters`; linear adapters are written as in format 2). Older files still read and resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

SELECTION_FILE = "selection.json"
ADAPTER_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 3
# What a resume that finds no selection.json is told.
RESUME_HINT = "Resume from a checkpoint of the same WeightLoRA run (each one holds a selection.json)."


@dataclass(frozen=True)
class AdapterRecord:
    """One selectable unit's fate (`wlora_trl.units`): its index and module, final omega (None without omega),
    whether kept, rank after the switch (its rank before it, until the switch; 0 when dropped), and its shape.

    `kind` is "linear" (one LoRA adapter on a linear module; `in_features` / `out_features` are its shape, None in
    files before v2), "experts" (an experts block: the adapters on the `num_experts` experts' parameters of one
    module) or "parameter" (LoRA on one 2-D parameter, such as a router's `gate.weight`; `num_experts` 1). Those two
    record `parameters` = {parameter name: {"in_features", "out_features" (of one expert), "rank_factor"}}, innermost
    wrapper first; a parameter's rank is `rank_factor * rank` (PEFT's `all-linear` gives a fused gate_up_proj 2r)."""

    index: int
    module: str
    omega: float | None
    kept: bool
    rank: int
    in_features: int | None = None
    out_features: int | None = None
    kind: str = "linear"
    num_experts: int | None = None
    parameters: dict[str, dict[str, int]] | None = None

    def __post_init__(self) -> None:
        # StoIHT zeroes a dropped adapter's omega with a 0/1 mask, which turns a negative omega into -0.0: record it as
        # 0.0, so selection.json never says "omega": -0.0 (every other value is kept exactly).
        if self.omega == 0:
            object.__setattr__(self, "omega", 0.0)

    @property
    def shape_known(self) -> bool:
        return self.parameters is not None if self.kind != "linear" else self.in_features is not None

    def numel(self, rank: int | None = None) -> int:
        """Its LoRA parameters at (unit) rank `rank`, its own by default; needs `shape_known`."""
        rank = self.rank if rank is None else rank
        if self.kind == "linear":
            return rank * (self.in_features + self.out_features)
        return (self.num_experts or 1) * sum(
            p["rank_factor"] * rank * (p["in_features"] + p["out_features"]) for p in self.parameters.values()
        )

    @property
    def target_parameters(self) -> list[str]:
        """Its full parameter names, as a stock `LoraConfig`'s `target_parameters` (none for a linear adapter)."""
        return [f"{self.module}.{name}" for name in self.parameters or {}]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if self.kind == "linear":  # the fields of format 2, unchanged for linear adapters
            for key in ("kind", "num_experts", "parameters"):
                data.pop(key)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterRecord:
        parameters = data.get("parameters")
        return cls(
            index=int(data["index"]),
            module=data["module"],
            omega=data["omega"],
            kept=bool(data["kept"]),
            rank=int(data["rank"]),
            in_features=data.get("in_features"),
            out_features=data.get("out_features"),
            kind=data.get("kind", "linear"),
            num_experts=data.get("num_experts"),
            parameters={name: dict(shape) for name, shape in parameters.items()} if parameters is not None else None,
        )


@dataclass(frozen=True)
class SelectionReport:
    """Everything about a run's selection, as written to `selection.json`."""

    method: str  # "WeightLoRA", "WeightLoRA+" or "random"
    adapter_name: str
    n: int
    k: int
    selection_steps: int | None  # T
    switched: bool
    switch_step: int | None  # T + 1 once switched
    step: int | None  # the optimizer step the report was taken at
    omega_lr: float
    reinit: bool
    adapters: tuple[AdapterRecord, ...]
    omega_steps: dict[str, int] = field(default_factory=dict)  # StoIHT step outcomes (taken, skipped: why)
    format_version: int = FORMAT_VERSION
    wlora_trl_version: str | None = None

    @property
    def selection_only(self) -> bool:
        """Saved right at the switch, which only `select_adapters` does (a run's own switch opens step T+1, so its
        saves come before it, at step <= T, or after it, at step > T): a stage-1 selection."""
        return self.switched and self.step == self.selection_steps

    @property
    def kept_modules(self) -> list[str]:
        return [a.module for a in self.adapters if a.kept]

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["adapters"] = [a.to_dict() for a in self.adapters]
        data["omega_steps"] = dict(self.omega_steps)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SelectionReport:
        version = data.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"selection.json has format_version {version}, newer than this wlora_trl reads ({FORMAT_VERSION}): "
                "upgrade wlora-trl."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["adapters"] = tuple(AdapterRecord.from_dict(a) for a in data["adapters"])
        values["format_version"] = version
        return cls(**values)


def write_selection(directory: str | os.PathLike, report: SelectionReport) -> str:
    """Write `selection.json` into `directory` (created if needed); returns its path."""
    from . import __version__

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SELECTION_FILE)
    data = dataclasses.replace(report, format_version=FORMAT_VERSION, wlora_trl_version=__version__).to_dict()
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def read_selection(
    location: str | os.PathLike, hint: str | None = None, *, check_weights: bool = False
) -> SelectionReport:
    """Read a `selection.json`, given its path or the folder holding it (a saved adapter, a checkpoint).

    Raises `FileNotFoundError` when there is none and `ValueError` when it is not a selection.json this version
    reads or contradicts itself (`check_selection`: n, K), each naming the file; `hint` replaces the default advice
    at the end of the missing-file message. `check_weights`: also check it against the `adapter_model.safetensors`
    beside it (`check_adapter_weights`: the modules its weights are on; a damaged file), when there is one."""
    path = os.fspath(location)
    if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, SELECTION_FILE)
    if not os.path.isfile(path):
        advice = hint or (
            "Give the folder of an adapter or checkpoint saved by a WeightLoRA trainer (save_model and every "
            "checkpoint write selection.json), or the path of a selection.json."
        )
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise FileNotFoundError(f"{os.path.dirname(path)} does not exist. {advice}")
        raise FileNotFoundError(
            f"{path} is missing: the folder was not written by a WeightLoRA trainer, so its selection (omega, kept "
            f"adapters) is unknown. {advice}"
        )
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): it is damaged; save the adapter again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a WeightLoRA selection (a JSON object).")
    try:
        report = SelectionReport.from_dict(data)
    except KeyError as err:
        raise ValueError(
            f"{path} is not a complete WeightLoRA selection.json: it has no {err.args[0]!r} entry. Was it written by "
            "wlora_trl (WeightLoraModel.report() / save_model)?"
        ) from None
    except (TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a WeightLoRA selection.json this version reads: {err}") from None
    check_selection(report, path)
    if check_weights:
        check_adapter_weights(report, os.path.dirname(path) or ".", path)
    return report


_DAMAGED = "it is damaged or was edited by hand; use the selection.json saved with this adapter, or save it again."


def check_selection(report: SelectionReport, path: str = SELECTION_FILE) -> None:
    """Refuse a record that contradicts itself (a `ValueError` naming `path`): one adapter record per index 0..n-1,
    each module once, and K kept after the switch (none before it). A selection.json cut short or edited by hand
    would otherwise report, pad or resume a selection that never was."""
    adapters = report.adapters
    if len(adapters) != report.n:
        raise ValueError(f"{path} lists {len(adapters)} adapters but says n = {report.n}: {_DAMAGED}")
    if [a.index for a in adapters] != list(range(report.n)):
        raise ValueError(f"{path} does not list its adapters by index 0 to {report.n - 1}: {_DAMAGED}")
    if len({a.module for a in adapters}) != len(adapters):
        raise ValueError(f"{path} lists a module twice: {_DAMAGED}")
    if not 1 <= report.k <= report.n:
        raise ValueError(f"{path} says K = {report.k}, outside 1..n = {report.n}: {_DAMAGED}")
    kept = sum(a.kept for a in adapters)
    if report.switched and kept != report.k:
        raise ValueError(f"{path} marks {kept} adapters kept but says K = {report.k}: {_DAMAGED}")
    if not report.switched and kept:
        raise ValueError(f"{path} was saved before the switch but marks {kept} of its adapters kept: {_DAMAGED}")


# An adapter tensor's key in a PEFT file: `base_model.model.<module>.lora_A.weight`; an experts block's inner
# wrappers are `<module>.base_layer.lora_A` (`wlora_trl.units`).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)(?:\.base_layer)*\.lora_(?:A|B|embedding_A|embedding_B)\b")


def adapter_file_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names in a safetensors file, read from its header (neither the tensors nor torch are loaded).

    A file cut short (an interrupted copy or save) is a `ValueError` naming the file and what to do, where
    safetensors raises its own `SafetensorError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return list(f.keys())
    except SafetensorError as err:
        raise unreadable_weights(path, err) from None


def unreadable_weights(path: str | os.PathLike, err: Exception) -> ValueError:
    """The error for a safetensors file that safetensors cannot open (`SafetensorError`): what it is, what to do."""
    return ValueError(
        f"{os.fspath(path)} cannot be read ({err}): the file is damaged or incomplete (an interrupted copy, download "
        "or save?); copy it again from where it was saved, or save the adapter again."
    )


def check_adapter_weights(report: SelectionReport, directory: str | os.PathLike, path: str = SELECTION_FILE) -> None:
    """Refuse a folder whose `adapter_model.safetensors` holds adapters on other modules than its selection.json
    describes (a `ValueError`): after the switch the kept ones (or all n, in a padded copy), before it all n. A folder
    without that file (`adapter_model.bin`, a bare selection.json) is not checked."""
    weights = os.path.join(os.fspath(directory), ADAPTER_FILE)
    if not os.path.isfile(weights):
        return
    present = {match[1] for key in adapter_file_keys(weights) if (match := _LORA_KEY.match(key))}
    every = {a.module for a in report.adapters}
    expected = set(report.kept_modules) if report.switched else every
    if present in (expected, every):  # after the switch, a padded copy holds (zero) adapters on every module
        return
    if report.switched:
        claim, role = f"marks {len(expected)} of its n = {report.n} adapters kept", "kept"
    else:
        claim, role = f"lists n = {report.n} adapters (saved before the switch, all of them in the weights)", "listed"
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    differences = [f"{len(missing)} {role} there have no weights (e.g. {missing[0]})"] if missing else []
    if unexpected:
        differences.append(f"the weights hold {len(unexpected)} not {role} there (e.g. {unexpected[0]})")
    raise ValueError(
        f"{weights} holds adapters on {len(present)} modules, but {path} {claim}: {'; '.join(differences)}. The "
        "folder's files do not belong together; use the folder as it was saved, or save the adapter again."
    )


# --- the selection as a layers x projections grid, and in one line ----------------------------------------------


def parse_module_name(name: str) -> tuple[int | None, str]:
    """(layer index, projection) of an adapted module's name, split at its first all-digit component.

    'model.layers.12.self_attn.q_proj' -> (12, 'self_attn.q_proj');
    'bert.encoder.layer.3.attention.self.query' -> (3, 'attention.self.query');
    a name without a numeric component (e.g. 'bert.pooler.dense') -> (None, the whole name).
    """
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit() and position + 1 < len(parts):
            return int(part), ".".join(parts[position + 1 :])
    return None, name


def _column_labels(projections: list[str]) -> list[str]:
    # 'q_proj' reads better than 'self_attn.q_proj', but BERT has three different '*.dense': keep the full
    # suffix whenever the last component alone would be ambiguous.
    short = [projection.rsplit(".", 1)[-1] for projection in projections]
    return short if len(set(short)) == len(short) else projections


def selection_grid(report: SelectionReport) -> dict:
    """The selection laid out as a layers x projections grid (what the heatmap draws).

    Returns {"layers": row labels, "projections": column keys, "labels": column labels, "omega": rows of
    floats (None where a layer has no such module or omega is unknown), "kept": rows of True/False/None}.
    Modules without a layer index get one row each, labelled by their name, after the layers.
    """
    layer_ids: list[int] = []
    projections: list[str] = []
    cells: dict[tuple, dict] = {}
    extra_rows: list[str] = []
    for adapter in report.adapters:
        layer, projection = parse_module_name(adapter.module)
        if layer is None:
            row, projection = adapter.module, "(outside the layers)"
            extra_rows.append(row)
        else:
            row = layer
            if layer not in layer_ids:
                layer_ids.append(layer)
        if projection not in projections:
            projections.append(projection)
        cells[(row, projection)] = adapter
    rows = sorted(layer_ids) + extra_rows
    omega = [[cells[(r, p)].omega if (r, p) in cells else None for p in projections] for r in rows]
    kept = [[cells[(r, p)].kept if (r, p) in cells else None for p in projections] for r in rows]
    return {
        "layers": [str(r) for r in rows],
        "projections": projections,
        "labels": _column_labels(projections),
        "omega": omega,
        "kept": kept,
    }


def kept_per_projection(report: SelectionReport) -> dict[str, tuple[int, int]]:
    """{projection label: (kept, present)}, in model order."""
    grid = selection_grid(report)
    counts = {}
    for column, label in enumerate(grid["labels"]):
        cells = [row[column] for row in grid["kept"] if row[column] is not None]
        counts[label] = (sum(cells), len(cells))
    return counts


def kept_by_projection(report: SelectionReport) -> str:
    """'q_proj 14/30, k_proj 9/30, ...': the kept count per projection type, in model order."""
    return ", ".join(f"{label} {kept}/{present}" for label, (kept, present) in kept_per_projection(report).items())


def switch_summary(report: SelectionReport) -> str:
    """One line for the console: 'kept 105 of 210 adapters (rank 8); per projection: q_proj 10/30, ...'."""
    ranks = ", ".join(map(str, sorted({a.rank for a in report.adapters if a.kept})))
    kept = sum(a.kept for a in report.adapters)
    return f"kept {kept} of {report.n} adapters (rank {ranks}); per projection: {kept_by_projection(report)}"
