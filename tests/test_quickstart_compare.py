"""quickstart --compare items map to pipeline compare entries (no training)."""

from __future__ import annotations

import pytest

from megatron_doremi.quickstart import parse_compare


def test_compare_items_map_to_pipeline_entries(tmp_path):
    got = parse_compare(
        f"proportional,temperature:3,unimax,odm,aioli,regmix,regmix-loglinear,mine={tmp_path}/w.json"
    )
    assert got == {
        "proportional": {"heuristic": "proportional"},
        "temperature": {"heuristic": "temperature", "temperature": 3.0},
        "unimax": {"heuristic": "unimax", "max_epochs": 1.0},
        "odm": {"mixer": {"type": "odm"}},
        "aioli": {"mixer": {"type": "aioli"}},
        "regmix": None,  # the swarm is trained first
        "regmix-loglinear": None,
        "mine": str(tmp_path / "w.json"),
    }
    for bad in ("aioli:2", "nope", "odm,odm"):
        with pytest.raises(ValueError, match="--compare"):
            parse_compare(bad)
