"""selection.json: one typed, versioned format, written and read in one place; older files still read and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model

from tests.testing_utils import tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraModel, __version__
from wlora_trl.selection import stoiht_step
from wlora_trl.state import FORMAT_VERSION, SelectionReport, read_selection, write_selection


def _warmup_report(tmp_path) -> tuple[WeightLoraModel, SelectionReport]:
    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=4, target_modules="all-linear", k=3, selection_steps=4))
    weight_lora = WeightLoraModel(model)
    weight_lora.set_omega(torch.linspace(-0.7, 1.3, weight_lora.num_adapters))
    return weight_lora, weight_lora.report(step=2)


def test_round_trip_is_exact_and_carries_the_versions(tmp_path):
    weight_lora, report = _warmup_report(tmp_path)
    path = write_selection(tmp_path, report)
    data = json.loads(open(path).read())
    assert data["format_version"] == FORMAT_VERSION and data["wlora_trl_version"] == __version__
    back = read_selection(path)
    assert back.adapters == report.adapters  # fp32 omega survives the JSON round trip bit for bit
    assert [a.omega for a in back.adapters] == weight_lora.omega.tolist()
    assert (back.n, back.k, back.selection_steps, back.step) == (14, 3, 4, 2)
    assert read_selection(tmp_path) == back  # the folder works as well as the file


def test_a_v0_1_file_without_the_new_fields_still_resumes(tmp_path):
    """What 0.1 wrote (no format_version, wlora_trl_version, omega_steps) must restore a model as before."""
    weight_lora, report = _warmup_report(tmp_path)
    data = report.to_dict()
    for key in ("format_version", "wlora_trl_version", "omega_steps"):
        data.pop(key)
    (tmp_path / "selection.json").write_text(json.dumps(data))
    old = read_selection(tmp_path)
    assert old.format_version == 0 and old.omega_steps == {}
    fresh = WeightLoraModel(
        get_peft_model(tiny_llama(), WeightLoraConfig(r=4, target_modules="all-linear", k=3, selection_steps=4))
    )
    fresh.restore(old)
    assert torch.equal(fresh.omega, weight_lora.omega) and fresh.selection_steps == 4


def test_a_newer_format_is_refused_with_what_to_do(tmp_path):
    _, report = _warmup_report(tmp_path)
    data = report.to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "selection.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="newer than this wlora_trl reads.*upgrade wlora-trl"):
        read_selection(tmp_path)


def test_a_folder_without_selection_json_says_what_it_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="not written by a WeightLoRA trainer"):
        read_selection(tmp_path)


def test_an_omega_thresholded_from_a_negative_value_is_written_as_zero_not_minus_zero(tmp_path):
    """StoIHT zeroes the dropped entries with a 0/1 mask, so a dropped negative omega is -0.0 in the tensor; the
    report and selection.json say 0.0 (they once wrote "omega": -0.0), every other value still exact."""
    weight_lora, _ = _warmup_report(tmp_path)
    omega = weight_lora.omega.clone()
    stoiht_step(omega, torch.full_like(omega, 1e-3), lr=1.0, k=3)
    negative_zeros = int(((omega == 0) & torch.signbit(omega)).sum())
    assert negative_zeros > 0  # what the thresholding made of the negative entries
    weight_lora.set_omega(omega)
    report = weight_lora.report(step=3)
    path = write_selection(tmp_path, report)
    assert "-0.0" not in open(path).read()
    for adapters in (report.adapters, read_selection(path).adapters):
        assert [a.omega for a in adapters] == omega.tolist()  # equal values (0.0 == -0.0): nothing else changed
        zeros = [a.omega for a in adapters if a.omega == 0]
        assert len(zeros) == weight_lora.num_adapters - 3 and all(math.copysign(1.0, w) == 1.0 for w in zeros)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(adapters=d["adapters"][:-1]), "lists 13 adapters but says n = 14"),
        (lambda d: d.update(n=15), "lists 14 adapters but says n = 15"),
        (lambda d: d.update(k=15), "says K = 15, outside 1..n = 14"),
        (lambda d: d["adapters"][2].update(kept=True), "was saved before the switch but marks 1 of its adapters kept"),
        (lambda d: d.update(switched=True), "marks 0 adapters kept but says K = 3"),
        (lambda d: d["adapters"].reverse(), "does not list its adapters by index 0 to 13"),
        (lambda d: d["adapters"][1].update(module=d["adapters"][0]["module"]), "lists a module twice"),
    ],
    ids=["cut", "n", "k", "kept_in_warmup", "switched_without_kept", "order", "twice"],
)
def test_a_record_that_contradicts_itself_is_refused_naming_the_file(tmp_path, edit, message):
    # Before: read as it was, so a report or a padded export described a selection that never happened.
    _, report = _warmup_report(tmp_path)
    data = report.to_dict()
    edit(data)
    (tmp_path / "selection.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"selection.json {message}.*damaged or was edited by hand"):
        read_selection(tmp_path)
