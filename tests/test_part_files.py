"""The one home of a part saved as config.json + model.safetensors (models/part_files.py)."""
import json

import pytest
import torch
from torch import nn

from unified_vlm.models.part_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_part_weights,
    read_part_config,
    save_part,
    state_dict_mismatch,
)


def test_save_then_load_round_trips_config_and_weights(tmp_path):
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    save_part(tmp_path / "part", {"width": 3, "note": [1, 2]}, module)
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert read_part_config(tmp_path / "part", "test part", "save_part") == {"width": 3, "note": [1, 2]}
    fresh = load_part_weights(nn.Linear(3, 2), tmp_path / "part", "test part")
    assert torch.equal(fresh.weight, module.weight) and torch.equal(fresh.bias, module.bias)


def test_missing_files_name_the_file_and_the_writer(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"does not exist: a test part directory holds {CONFIG_NAME}"):
        read_part_config(tmp_path / "nowhere", "test part", "`make-part`")
    save_part(tmp_path, {}, nn.Linear(1, 1))
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} not found.*`make-part`"):
        read_part_config(tmp_path, "test part", "`make-part`")


def test_weights_of_another_architecture_are_refused_before_loading(tmp_path):
    save_part(tmp_path, {}, nn.Linear(3, 2))
    target = nn.Sequential(nn.Linear(3, 4))
    before = target[0].weight.clone()
    with pytest.raises(ValueError, match="test part weights .* do not match the architecture in its config.json"):
        load_part_weights(target, tmp_path, "test part")
    assert torch.equal(target[0].weight, before)
    json.loads((tmp_path / CONFIG_NAME).read_text())  # the files are left as they were


def test_mismatch_lists_missing_unexpected_and_shapes():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    found = {"a": torch.zeros(4), "b": torch.zeros(3), "d": torch.zeros(1)}
    assert state_dict_mismatch(expected, found) == [
        "missing keys ['c'] (1 in all)",
        "unexpected keys ['d'] (1 in all)",
        "shape mismatches ['a: file (4,) vs model (2,)'] (1 in all)",
    ]
    assert state_dict_mismatch(expected, expected) == []
