"""`WeightLoraConfig`: a `peft.LoraConfig` plus the knobs of WeightLoRA.

WeightLoRA (Veprikov et al., "WeightLoRA: Keep Only Necessary Adapters", ACL 2026, arXiv:2506.02724) gives
every LoRA adapter a scalar weight omega_i. For the first T optimizer steps omega is trained by StoIHT (an SGD
step, then hard thresholding to the K entries of largest magnitude); at step T the adapters with omega_i = 0 are
removed and training continues as plain LoRA on the K kept adapters. WeightLoRA+ keeps K = n/2 and doubles the
rank of the kept adapters, so the total rank equals LoRA's n * r.

The config is a `LoraConfig` (its `peft_type` stays `LORA`), so `get_peft_model` and TRL's `peft_config=` accept
it unchanged; every check runs in `__post_init__` and says what to change. Checks that need the number of
adapters n or the run's `max_steps` live in `resolve_k` / `resolve_selection_steps`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

# Floor for T when `selection_steps` is a fraction: the paper's ablations use T = 5, and step 1 gives omega no
# gradient (B = 0), so fewer steps leave almost nothing to rank by.
MIN_SELECTION_STEPS = 5

# `init_lora_weights` values whose A/B initialisation the switch can redo (A random, B zero).
SUPPORTED_INITS = (True, "gaussian")

CITATION = """@inproceedings{veprikov2026weightlora,
  title     = {WeightLoRA: Keep Only Necessary Adapters},
  author    = {Veprikov, Andrey and others},
  booktitle = {Proceedings of the Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2026},
  note      = {arXiv:2506.02724}
}"""


# Every boolean field WeightLoRA's behaviour depends on: its own two and the LoraConfig flags the switch rebuilds
# (LoRA variants such as use_dora are refused anyway, but a string there must not read as "enabled").
BOOL_FIELDS = (
    "plus",
    "reinit",
    "use_rslora",
    "fan_in_fan_out",
    "inference_mode",
    "use_dora",
    "use_qalora",
    "lora_bias",
    "ensure_weight_tying",
)


# WeightLoRA's own fields, beside LoraConfig's: a stock adapter_config.json (every export) has none of them.
WEIGHT_LORA_FIELDS = ("k", "selection_steps", "omega_lr", "plus", "reinit", "selection")


def _is_number(value: object) -> bool:
    # bool is an int subclass: `k=True` is a typo, not "keep one adapter".
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class WeightLoraConfig(LoraConfig):
    """LoRA config for WeightLoRA / WeightLoRA+ ([arXiv:2506.02724](https://arxiv.org/abs/2506.02724)); every
    `LoraConfig` field keeps its meaning, and `get_peft_model` / TRL's `peft_config=` take it unchanged.

    Args:
        k (`int | float`, defaults to `0.5`): K, the adapters kept at the switch: an int is a count, a float in
            (0, 1] a fraction of the n adapters, rounded down. WeightLoRA+ requires n/2.
        selection_steps (`int | float`, defaults to `0.005`): T, the optimizer steps of the warm-up (the switch
            opens step T+1): an int is a count (>= 2), a float in (0, 1) a fraction of `max_steps`, rounded up, at
            least `MIN_SELECTION_STEPS` (5).
        omega_lr (`float`, defaults to `100.0`): step size of the SGD step on omega; not scheduled, not clipped.
        plus (`bool`, defaults to `False`): WeightLoRA+: keep n/2 adapters at rank 2r (alpha doubled, so alpha/r
            is unchanged), LoRA's parameter budget.
        reinit (`bool`, defaults to `True`): re-initialise kept adapters at the switch (the paper); False keeps
            their weights and folds omega into B, so the switch does not change the model's function. In the
            SmolLM2 / GSM8K quality study (docs: Benchmarks) False lowered the held-out loss slightly on every seed,
            more with a longer warm-up: prefer it when T is a large share of the run, or when the switch must not
            change the model. In the GLUE study on an encoder it made no consistent difference (either sign, by seed
            and by task).
        selection (`"stoiht" | "random"`, defaults to `"stoiht"`): the paper's method, or K random adapters kept
            after T steps without omega (the paper's RLoRA ablation). StoIHT beat random selection on every seed of
            the GSM8K study; in the GLUE study on an encoder it was ahead on average on every task, on every seed on
            MRPC only.

    `target_parameters` (LoRA on parameters: the experts of mixture-of-experts models, which PEFT also adds by itself
    for some families with `target_modules="all-linear"`) makes each module's parameters one selectable unit, such
    as a layer's experts block (`wlora_trl.units`); PEFT needs `lora_dropout=0` there.

    Raises `ValueError` for values outside those ranges and for LoRA features the switch cannot rebuild (DoRA and
    the other variants, `lora_bias`, inits other than PEFT's default and `"gaussian"`), each message saying what to
    change. The exported adapter is a stock `LoraConfig`; `WeightLoraConfig.from_pretrained` reads the run's
    WeightLoRA fields back from the `selection.json` beside it.

    Example:
        ```python
        from wlora_trl import WeightLoraConfig

        config = WeightLoraConfig(r=8, lora_alpha=16, target_modules="all-linear")               # WeightLoRA
        config_plus = WeightLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", plus=True)  # WeightLoRA+
        ```
    """

    k: int | float = field(
        default=0.5,
        metadata={
            "help": "K, the number of adapters kept at the switch. An int is a count; a float in (0, 1] is a "
            "fraction of the n adapters, rounded down. The paper's default, and the only value WeightLoRA+ "
            "accepts, is n/2."
        },
    )
    selection_steps: int | float = field(
        default=0.005,
        metadata={
            "help": "T, the number of optimizer steps during which omega is trained and thresholded; the switch "
            "happens at the start of step T+1. An int is a step count; a float in (0, 1) is a fraction of "
            f"max_steps, rounded up, at least {MIN_SELECTION_STEPS}. The paper uses about 0.5% of training."
        },
    )
    omega_lr: float = field(
        default=100.0,
        metadata={
            "help": "Step size of the plain SGD step on omega (omega <- omega - omega_lr * grad). Not scaled by the "
            "learning-rate schedule and not clipped with the other gradients, so a long LR warm-up does not "
            "freeze the selection. omega's gradient is small, so the step size is large: in the GSM8K study's "
            "sweep (docs: benchmarks) 10, 100 and 1000 ended at the same held-out loss."
        },
    )
    plus: bool = field(
        default=False,
        metadata={
            "help": "WeightLoRA+: keep K = n/2 adapters and give each rank 2r at the switch (lora_alpha doubled, so "
            "the scaling alpha/r is unchanged), matching LoRA's total rank n*r."
        },
    )
    reinit: bool = field(
        default=True,
        metadata={
            "help": "Re-initialise kept adapters at the switch (A random, B zero), as the paper does. False keeps "
            "their trained A and B and folds omega_i into B, so the model's function is unchanged by the switch; in "
            "the GSM8K study (docs: benchmarks) it lowered the held-out loss slightly on every seed (more with a longer "
            "warm-up), so prefer it when T is a large share of the run, and for DPO (the docs' trainers page); in the "
            "GLUE study on an encoder it made no consistent difference (either sign, by seed and by task)."
        },
    )
    selection: Literal["stoiht", "random"] = field(
        default="stoiht",
        metadata={
            "help": "'stoiht': the paper's method. 'random': no omega; all adapters train as plain LoRA for T steps, "
            "then K random ones are kept (the paper's RLoRA ablation, a baseline for the selection itself). In the "
            "GSM8K study (docs: benchmarks) StoIHT's kept set beat random selection on every seed; in the GLUE study "
            "on an encoder it was ahead on average on every task, on every seed on MRPC only."
        },
    )

    def __post_init__(self) -> None:
        self._check_field_types()  # before PEFT's own checks, which would misread a string as a bool too
        super().__post_init__()
        self._check_weight_lora_fields()
        self._check_lora_features()

    def _check_field_types(self) -> None:
        """A value of the wrong type is refused, not misread: `reinit="no"` is a non-empty string, so truthy, and would
        silently mean reinit=True (configs read from YAML or a command line easily carry strings)."""
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                spelled = "True" if str(value).strip().lower() in ("true", "yes", "1", "on") else "False"
                raise TypeError(
                    f"{name}={value!r} is a {type(value).__name__}; pass a bool, {name}={spelled} (a string such as "
                    "'no' or 'false' would count as True). Parse YAML / command-line values into bools first."
                )
        checks = {  # field: (its type is right, its value is in range, what to pass)
            "r": (isinstance(self.r, int) and not isinstance(self.r, bool), lambda: self.r >= 1, "an int >= 1, r=8"),
            "lora_alpha": (
                _is_number(self.lora_alpha),
                lambda: self.lora_alpha > 0,
                "a positive number, lora_alpha=16",
            ),
            "lora_dropout": (
                _is_number(self.lora_dropout),
                lambda: 0 <= self.lora_dropout < 1,
                "a float in [0, 1), lora_dropout=0.05",
            ),
        }
        for name, (typed, in_range, hint) in checks.items():
            if not typed or not in_range():
                error = ValueError if typed else TypeError
                raise error(f"{name}={getattr(self, name)!r}: pass {hint} for example.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={self.bias!r}: choose 'none' (the default), 'lora_only' or 'all'.")

    def _check_weight_lora_fields(self) -> None:
        if not _is_number(self.k) or self.k <= 0 or (isinstance(self.k, float) and self.k > 1):
            raise ValueError(
                f"k={self.k!r}: pass an int >= 1 (number of adapters to keep) or a float in (0, 1] (fraction of "
                "all adapters), e.g. k=0.5 for the paper's default."
            )
        steps = self.selection_steps
        if not _is_number(steps) or steps <= 0 or (isinstance(steps, float) and steps >= 1):
            raise ValueError(
                f"selection_steps={steps!r}: pass an int >= 1 (optimizer steps before the switch) or a float in "
                "(0, 1) (fraction of max_steps), e.g. selection_steps=0.005 for the paper's default."
            )
        if isinstance(steps, int) and steps < 2 and self.selection == "stoiht":
            raise ValueError(
                f"selection_steps={steps}: at step 1 every B is zero, so omega gets no gradient and nothing can be "
                "ranked. Use selection_steps >= 2 (the paper's ablations use 5)."
            )
        if not _is_number(self.omega_lr) or not math.isfinite(self.omega_lr) or self.omega_lr <= 0:
            raise ValueError(f"omega_lr={self.omega_lr!r}: pass a positive finite step size, e.g. omega_lr=100.")
        if self.selection not in ("stoiht", "random"):
            raise ValueError(f"selection={self.selection!r}: choose 'stoiht' (the paper's method) or 'random'.")
        if self.plus and isinstance(self.k, float) and self.k != 0.5:
            raise ValueError(
                f"plus=True keeps exactly half of the adapters (K = n/2) so that the doubled ranks match LoRA's "
                f"budget; k={self.k} contradicts it. Drop k, or set plus=False to choose K freely."
            )

    def _check_lora_features(self) -> None:
        variants = [
            f.name
            for f in dataclasses.fields(LoraConfig)
            if f.metadata.get("is_lora_variant") and getattr(self, f.name, None)
        ]
        if variants:
            raise ValueError(
                f"WeightLoRA handles plain LoRA adapters only; this config enables the LoRA variant(s) {variants}. "
                "Set them to False/None, or use peft.LoraConfig without WeightLoRA."
            )
        if self.init_lora_weights not in SUPPORTED_INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: the switch re-initialises kept "
                "adapters as standard LoRA (A random, B zero). Use init_lora_weights=True (PEFT's default) or "
                "'gaussian'."
            )
        if self.target_parameters and self.lora_dropout:
            raise ValueError(
                f"target_parameters={self.target_parameters} with lora_dropout={self.lora_dropout}: PEFT's adapters on "
                "parameters (mixture-of-experts weights) cannot apply dropout (its ParamWrapper refuses it). Set "
                "lora_dropout=0."
            )
        unsupported = {
            "lora_bias": self.lora_bias,
            "layer_replication": self.layer_replication,
            "use_qalora": self.use_qalora,
        }
        enabled = [name for name, value in unsupported.items() if value]
        if enabled:
            raise ValueError(
                f"WeightLoRA does not support {enabled}: omega gates the adapter's low-rank path, which these options "
                "change. Leave them at their defaults."
            )

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> WeightLoraConfig:
        """A `WeightLoraConfig` from a folder (or hub repo) holding an `adapter_config.json`; PEFT's own loader would
        return a plain `LoraConfig` and drop `k`, `selection_steps`, `omega_lr`, `plus`, `reinit` and `selection`.

        - Written by `WeightLoraConfig.save_pretrained`: the file holds those fields; they are read as saved.
        - Saved by a WeightLoRA trainer or `save_adapter` (a stock LoRA config, which loads without wlora_trl, plus
          `selection.json`): the fields are the run's, from selection.json (K and T as the counts the run resolved),
          and the LoRA fields too: `target_modules` / `target_parameters` name every adapter the run selected from
          (the file lists the kept ones only after the switch), and WeightLoRA+'s doubled rank and alpha are halved
          back. After the switch, `rank_pattern` / `alpha_pattern` hold the kept adapters' entries only (a warning
          says so when there are any).
        - A stock LoRA config without selection.json: the fields take their defaults, with a warning naming them.

        `subfolder` and the keyword arguments are those of `LoraConfig.from_pretrained` (hub download arguments)."""
        hub_kwargs, class_kwargs, _ = cls._split_kwargs(kwargs)
        from peft.utils import CONFIG_NAME

        config_file = _file_in(pretrained_model_name_or_path, subfolder, CONFIG_NAME, hub_kwargs)
        if config_file is None:
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{pretrained_model_name_or_path}'")
        attributes = {**class_kwargs, **cls.from_json_file(config_file)}
        if attributes.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{config_file} is a {attributes['peft_type']} config, not LoRA: WeightLoRA selects LoRA "
                             "adapters. Load it with peft.PeftConfig.from_pretrained.")  # fmt: skip
        if not set(WEIGHT_LORA_FIELDS) & attributes.keys():
            from .state import SELECTION_FILE, read_selection

            selection = _file_in(pretrained_model_name_or_path, subfolder, SELECTION_FILE, hub_kwargs)
            if selection is not None:
                attributes.update(_run_fields(read_selection(selection), attributes, selection))
            else:
                defaults = ", ".join(f"{name}={getattr(cls, name)!r}" for name in WEIGHT_LORA_FIELDS)
                warnings.warn(
                    f"{config_file} is a stock LoRA config (an exported adapter holds none of WeightLoRA's fields) and "
                    f"no {SELECTION_FILE} is beside it, where a WeightLoRA save records the run's: the returned "
                    f"WeightLoraConfig has the defaults {defaults}.",
                    UserWarning,
                    stacklevel=2,
                )
        return cls.from_peft_type(**cls.check_kwargs(**attributes))

    @classmethod
    def from_peft_type(cls, **kwargs) -> WeightLoraConfig:
        """This class from a config's fields (PEFT's version maps `peft_type="LORA"` to `LoraConfig`); fields this
        PEFT does not know, from a newer one, are left out with a warning, as PEFT does."""
        if kwargs.get("peft_type", "LORA") != "LORA":
            return super().from_peft_type(**kwargs)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unexpected = sorted(kwargs.keys() - known)
        if unexpected:
            warnings.warn(
                f"Unexpected keyword arguments {unexpected} for class {cls.__name__}, these are ignored: the config "
                "was probably saved with a newer PEFT.",
                UserWarning,
                stacklevel=3,
            )
        return cls(**{key: value for key, value in kwargs.items() if key in known})

    # --- resolution against the model and the run -------------------------------------------------------------

    def resolve_k(self, num_adapters: int) -> int:
        """K as a count for a model with `num_adapters` adapters; raises if it keeps none or more than exist."""
        if self.plus:
            k = num_adapters // 2
            if isinstance(self.k, int) and self.k != k:
                raise ValueError(
                    f"plus=True keeps K = n/2 = {k} of the {num_adapters} adapters (their rank doubles to match "
                    f"LoRA's budget), but k={self.k} was given. Drop k, or set plus=False."
                )
        elif isinstance(self.k, float):
            k = math.floor(self.k * num_adapters)
        else:
            k = self.k
        if k < 1:
            raise ValueError(
                f"k={self.k} keeps {k} of the {num_adapters} adapters. Raise k (to at least {1 / num_adapters:.3g} "
                "as a fraction, or 1 as a count) or target more modules."
            )
        if k > num_adapters:
            raise ValueError(
                f"k={self.k} asks to keep {k} adapters but the model has only {num_adapters}. Use k <= "
                f"{num_adapters}, or a fraction such as k=0.5."
            )
        return k

    def resolve_selection_steps(self, max_steps: int, run: str | None = None) -> int:
        """T as a step count for a run of `max_steps` optimizer steps; raises if the switch would never happen.
        `run` says where `max_steps` came from when the user did not set it (an epoch-based run's step count)."""
        if isinstance(self.selection_steps, float):
            steps = max(math.ceil(self.selection_steps * max_steps), MIN_SELECTION_STEPS)
        else:
            steps = self.selection_steps
        if steps >= max_steps:
            length = f"the run's {run}" if run else f"the run has only max_steps={max_steps}"
            raise ValueError(
                f"selection_steps resolves to T={steps}, but {length}: the switch at step T+1 would never happen. "
                f"Train for more than {steps} steps (more epochs or data, or max_steps), or pass a smaller int "
                "selection_steps."
            )
        return steps


def _file_in(name_or_path: str | os.PathLike, subfolder: str | None, filename: str, hub_kwargs: dict) -> str | None:
    """The path of `filename` in a local folder, or downloaded from the hub repo `name_or_path`; None if absent."""
    folder = os.path.join(name_or_path, subfolder) if subfolder is not None else os.fspath(name_or_path)
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    if os.path.isdir(folder):
        return None
    from huggingface_hub import hf_hub_download
    from transformers.utils.hub import http_user_agent

    try:
        return hf_hub_download(
            os.fspath(name_or_path),
            filename,
            subfolder=subfolder,
            **{"user_agent": http_user_agent(), **hub_kwargs},
        )
    except Exception:  # not there, or no hub: as PEFT's from_pretrained, which tries the same
        return None


def _run_fields(report, attributes: dict, path: str) -> dict:
    """The WeightLoraConfig fields of the run a saved adapter (`attributes`: its stock adapter_config.json) came from,
    its `selection.json` read as `report`."""
    from .surgery import alpha_for_rank

    fields = {
        "k": report.k,
        "omega_lr": report.omega_lr,
        "reinit": report.reinit,
        "plus": report.method == "WeightLoRA+",
        "selection": "random" if report.method == "random" else "stoiht",
    }
    if report.selection_steps is not None:
        fields["selection_steps"] = report.selection_steps
    modules = [a.module for a in report.adapters if a.kind == "linear"]
    parameters = [name for a in report.adapters for name in a.target_parameters]
    fields.update(target_modules=modules or (None if parameters else []), target_parameters=parameters or None)
    ranks, alphas = attributes.get("rank_pattern") or {}, attributes.get("alpha_pattern") or {}
    if report.switched and fields["plus"]:  # the switch doubled every kept rank, alpha keeping the adapters' scaling
        r, rslora = attributes.get("r", 8), attributes.get("use_rslora", False)
        fields.update(
            r=r // 2,
            lora_alpha=alpha_for_rank(attributes.get("lora_alpha", 8), r, r // 2, rslora),
            rank_pattern={name: rank // 2 for name, rank in ranks.items()},
            alpha_pattern={
                name: alpha_for_rank(alpha, ranks.get(name, r), ranks.get(name, r) // 2, rslora)
                for name, alpha in alphas.items()
            },
        )
    if report.switched and (ranks or alphas) and not all(a.kept for a in report.adapters):
        warnings.warn(
            f"{path}: the adapter's rank_pattern / alpha_pattern name the kept adapters only (the switch dropped the "
            "others from the saved adapter), so the returned WeightLoraConfig gives the dropped ones r and lora_alpha; "
            "set rank_pattern / alpha_pattern again to train the run's adapters as they were.",
            UserWarning,
            stacklevel=3,
        )
    return fields
