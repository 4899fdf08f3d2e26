"""The HF export's max_position_embeddings: the trained seq_length unless the user set it."""

from __future__ import annotations

import json

from megatron_doremi.training.export import _trained_positions


def test_trained_positions(tmp_path):
    def write(model):
        (tmp_path / "run_config.json").write_text(
            json.dumps({"model": model, "schedule": {"seq_length": 96}})
        )
        return _trained_positions(str(tmp_path))

    assert write({"model_type": "llama", "hidden_size": 8}) == 96  # unset: the trained length
    assert write({"model_type": "llama", "max_position_embeddings": 512}) is None  # the user's value stays
    assert write("path/to/hf_dir") is None  # a pretrained dir's own config
    assert _trained_positions(str(tmp_path / "missing")) is None
