"""`wlora-trl report` / `export` on bad input: one line that names the file and says what to do, exit code 2, and no
traceback; `export` answers before its heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from wlora_trl.cli import main as cli_main


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "no_adapters").mkdir()
    (tmp_path / "no_adapters" / "selection.json").write_text(json.dumps({"method": "WeightLoRA", "n": 4}))
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "selection.json").write_text('{"method": ')
    (tmp_path / "a_list").mkdir()
    (tmp_path / "a_list" / "selection.json").write_text("[1, 2]")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    return tmp_path


@pytest.mark.parametrize("command", [["report"], ["export", "--padded"]])
def test_a_selection_without_adapters_is_named_not_a_key_error(capsys, folders, command):
    # Before: a raw KeyError traceback.
    err = _error(
        capsys, [*command, str(folders / "no_adapters"), *([str(folders / "out")] if len(command) > 1 else [])]
    )
    assert "no_adapters/selection.json is not a complete WeightLoRA selection.json: it has no 'adapters' entry" in err


@pytest.mark.parametrize("command", [["report"], ["export", "--padded"]])
def test_damaged_json_names_the_file(capsys, folders, command):
    target = [str(folders / "out")] if len(command) > 1 else []
    assert "damaged/selection.json is not valid JSON" in _error(capsys, [*command, str(folders / "damaged"), *target])
    assert "a_list/selection.json holds a list" in _error(capsys, [*command, str(folders / "a_list"), *target])


def test_a_folder_without_selection_does_not_talk_about_resuming(capsys, folders):
    err = _error(capsys, ["report", str(folders / "empty")])
    assert "empty/selection.json is missing" in err and "Resume" not in err
    assert "saved by a WeightLoRA trainer" in err
    assert "does not exist" in _error(capsys, ["report", str(folders / "no-such-folder")])


def test_export_to_a_file_says_to_give_a_folder(capsys, folders):
    # Before: "[Errno 17] File exists".
    err = _error(capsys, ["export", "--padded", str(folders / "no_adapters"), str(folders / "a_file")])
    assert "a_file is a file; give a folder" in err


def test_export_rejects_its_arguments_before_importing_torch(folders):
    # Before: 7-8 s of PEFT / transformers imports to say that --padded was missing.
    probe = textwrap.dedent(
        f"""
        import sys
        from wlora_trl.cli import main
        for argv in (["export", {str(folders)!r}, "out"], ["export", "--padded", {str(folders / "empty")!r}, "out"]):
            try:
                main(argv)
            except SystemExit as exit_:
                assert exit_.code == 2, exit_.code
        heavy = sorted(name for name in ("torch", "peft", "transformers") if name in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
