"""Downstream evaluation with lm-eval-harness on a local task (a jsonl file and a task YAML; nothing downloaded)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_doremi.evaluate import main

DOCS = [
    ("the cat sat on the", ["mat", "park"], 0),
    ("a dog ran in the", ["mat", "park"], 1),
    ("red green", ["blue", "cat"], 0),
    ("the dog sat on the", ["mat", "blue"], 0),
]


def _hf_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_doremi.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["the cat sat on the mat", "a dog ran in the park", "red green blue"] * 10, 300, path)
    cfg = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _local_task(root):
    root.mkdir()
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n" for q, c, g in DOCS))
    (root / "toy.yaml").write_text(
        f"task: toy_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{query}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n'
    )
    return str(root)


def test_lm_eval_on_a_local_task(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    hf = _hf_model(tmp_path / "hf")
    include = _local_task(tmp_path / "tasks")
    rc = main(
        ["--hf", hf, "--lm-eval", "toy_local", "--lm-eval-include", include, "--lm-eval-batch-size", "2"]
    )
    assert rc == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "hf" / "lm_eval.json").read_text())
    acc = out["tasks"]["toy_local"]["acc,none"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0) and out["n_samples"]["toy_local"]["effective"] == len(DOCS)
    # the same numbers next to an --output file (default name lm_eval.json in its directory)
    rc = main(["--hf", hf, "--lm-eval", "toy_local", "--lm-eval-include", include,
               "--output", str(tmp_path / "res" / "eval.json")])  # fmt: skip
    assert rc == 0
    assert (
        json.loads((tmp_path / "res" / "lm_eval.json").read_text())["tasks"]["toy_local"]["acc,none"] == acc
    )
    # an unknown task is an error naming it
    assert main(["--hf", hf, "--lm-eval", "no_such_task", "--lm-eval-include", include]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_lm_eval_needs_an_hf_dir_and_the_package(tmp_path, capsys):
    assert main(["--hf", str(tmp_path), "--lm-eval", "x"]) == 2
    assert "HF model directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["--hf", str(tmp_path), "--lm-eval", "x"]) == 2
    err = capsys.readouterr().err
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert "pip install" in err
    else:
        assert "unknown task" in err
    assert main(["--lm-eval", "x"]) == 2  # no model
    assert not os.path.exists(tmp_path / "lm_eval.json")
