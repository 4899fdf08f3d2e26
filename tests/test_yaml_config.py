"""YAML run/pipeline configs beside JSON (same schema, errors with the line), ``--set key=@file`` references,
tracking / exit options validation, and the install check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_doremi.training.config import ConfigError, load_run_config, parse_override
from tests.test_config import env  # noqa: F401 - the fixture: shards, mixture, a valid base config

REPO = Path(__file__).resolve().parent.parent


def _yaml(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _line_of(path: str, text: str) -> int:
    return next(i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if text in line)


def test_yaml_and_json_give_the_same_config(env):  # noqa: F811
    tmp_path, base = env
    (tmp_path / "run.json").write_text(json.dumps(base))
    from_json = load_run_config(tmp_path / "run.json")
    from_yaml = load_run_config(_yaml(tmp_path, base))
    assert from_yaml.to_dict() == from_json.to_dict()


def test_yaml_numbers_booleans_and_strings_follow_json(env):  # noqa: F811
    tmp_path, base = env
    text = Path(_yaml(tmp_path, base)).read_text().replace("lr: 0.001", "lr: 1e-3")
    text += "progress_bar: false\ndescription: on\n"  # YAML 1.1 would make `on` a boolean
    path = tmp_path / "run.yml"
    path.write_text(text)
    cfg = load_run_config(path)
    assert cfg.schedule["lr"] == 1e-3 and cfg.progress_bar is False and cfg.description == "on"


def test_yaml_syntax_error_names_the_line(env):  # noqa: F811
    tmp_path, base = env
    path = Path(_yaml(tmp_path, base))
    lines = path.read_text().splitlines()
    bad = _line_of(str(path), "micro_batch_size")
    lines[bad - 1] = lines[bad - 1] + ": 3"  # "a: 2: 3": a mapping value where none is allowed
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"run\.yaml:{bad}: invalid YAML in run config"):
        load_run_config(path)


def test_yaml_duplicate_key_names_the_line(env):  # noqa: F811
    tmp_path, base = env
    path = Path(_yaml(tmp_path, base))
    path.write_text(path.read_text() + "seed: 1\nseed: 2\n")
    last = len(path.read_text().splitlines())
    with pytest.raises(ConfigError, match=rf"run\.yaml:{last}: duplicate key 'seed'"):
        load_run_config(path)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_schema_errors_name_the_line_of_the_key(env, fmt):  # noqa: F811
    tmp_path, base = env
    cfg = json.loads(json.dumps(base))
    cfg["schedule"]["lrr"] = 1.0
    if fmt == "yaml":
        path = _yaml(tmp_path, cfg)
    else:
        path = str(tmp_path / "run.json")
        Path(path).write_text(json.dumps(cfg, indent=1))
    line = _line_of(path, "lrr")
    with pytest.raises(ConfigError, match=rf"run\.{fmt}:{line}: unknown key 'schedule\.lrr'"):
        load_run_config(path)
    cfg = json.loads(json.dumps(base))
    cfg["schedule"]["micro_batch_size"] = (
        3  # 8 is not a multiple of 3: the message names two keys, the first wins
    )
    path = _yaml(tmp_path, cfg)
    line = _line_of(path, "global_batch_size")
    with pytest.raises(
        ConfigError, match=rf"run\.yaml:{line}: schedule\.global_batch_size \(8\) must be a multiple"
    ):
        load_run_config(path)


def test_an_overridden_key_gets_no_file_line(env):  # noqa: F811
    tmp_path, base = env
    path = _yaml(tmp_path, base)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, ["schedule.lr=-1"])
    assert str(info.value).startswith(f"{path} (with --set overrides): schedule.lr must be >= 0")


def test_yaml_pipeline_config_reads_like_json(tmp_path):
    from megatron_doremi.pipeline import load_pipeline_config

    doc = json.loads((REPO / "examples" / "quickstart" / "pipeline.json").read_text())
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert (
        load_pipeline_config(path)[0]
        == load_pipeline_config(REPO / "examples" / "quickstart" / "pipeline.json")[0]
    )


def test_set_value_from_a_file(env):  # noqa: F811
    tmp_path, base = env
    weights = {
        "average": {"weights": {"alpha": 0.25, "beta": 0.75}, "data_path": "..."},
        "final": {"weights": {"alpha": 0.5, "beta": 0.5}},
    }
    (tmp_path / "domain_weights.json").write_text(json.dumps(weights))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base))
    cfg = load_run_config(path, [f"mixer.weights=@{tmp_path / 'domain_weights.json'}"])
    assert cfg.mixer["weights"] == {"alpha": 0.25, "beta": 0.75}
    # a mixture file gives its domain weights; any other key takes the file's document as it is (YAML too)
    assert parse_override(f"mixer.weights=@{tmp_path / 'mixture.json'}")[1] == {"alpha": 1, "beta": 1}
    (tmp_path / "sched.yaml").write_text("lr: 2e-4\nwarmup_iters: 1\n")
    assert parse_override(f"eval=@{tmp_path / 'sched.yaml'}") == (["eval"], {"lr": 2e-4, "warmup_iters": 1})
    with pytest.raises(ConfigError, match="missing.json: cannot read --set mixer.weights value"):
        parse_override("mixer.weights=@missing.json")
    with pytest.raises(ConfigError, match="'@' must be followed by"):
        parse_override("mixer.weights=@")


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"checkpoint": {"exit_signals": ["SIGKILL"]}}, r"exit_signals\[0\]: SIGKILL cannot be caught"),
        ({"checkpoint": {"exit_signals": ["SIGNOPE"]}}, r"exit_signals\[0\]: unknown signal 'SIGNOPE'"),
        ({"checkpoint": {"exit_signals": "SIGTERM"}}, r"exit_signals must be a list"),
        ({"checkpoint": {"exit_duration_mins": 0}}, r"exit_duration_mins must be a number > 0"),
        ({"checkpoint": {"exit_duration_mins": 5}}, r"exit_duration_mins stops the run after a checkpoint"),
        ({"tracking": {"wandb": {"projct": "x"}}}, r"unknown key 'tracking\.wandb\.projct'"),
        ({"tracking": {"wandb": {"mode": "later"}}}, r"tracking\.wandb\.mode must be"),
        ({"tracking": {"tensorboard": "yes"}}, r"tracking\.tensorboard must be true or false"),
        ({"tracking": {"name": ""}}, r"tracking\.name must be a non-empty string"),
        ({"health": {"peak_tflops": -1}}, r"health\.peak_tflops must be >= 0"),
    ],
)
def test_exit_and_tracking_options_are_checked(env, section, match):  # noqa: F811
    tmp_path, base = env
    cfg = json.loads(json.dumps(base))
    for key, value in section.items():
        cfg.setdefault(key, {}).update(value)
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_run_config(tmp_path / "run.json")


def test_exit_options_defaults_and_normalised_names(env):  # noqa: F811
    tmp_path, base = env
    cfg = load_run_config(None, base=base)
    assert (
        cfg.checkpoint["exit_signals"] == ["SIGTERM", "SIGUSR1"]
        and cfg.checkpoint["exit_duration_mins"] is None
    )
    base = {**base, "checkpoint": {"save": str(tmp_path / "ck"), "exit_signals": ["usr2", 15, "TERM"]}}
    cfg = load_run_config(None, base=base)
    assert cfg.checkpoint["exit_signals"] == ["SIGUSR2", "SIGTERM"]
    assert cfg.tracking == {"tensorboard": False, "wandb": None, "mlflow": None, "group": None, "name": None}


def test_a_configured_tracker_that_is_not_installed_is_an_error(env, monkeypatch):  # noqa: F811
    import importlib.util

    tmp_path, base = env
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"tracking\.wandb is configured but wandb is not installed: pip install"
    ):
        load_run_config(None, base={**base, "tracking": {"wandb": {"mode": "offline"}}})
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"tracking\.tensorboard is configured but tensorboard is not installed"
    ):
        load_run_config(None, base={**base, "tensorboard": True})  # the old top-level key is an alias


def test_install_check_names_the_old_dependency(monkeypatch):
    import importlib.metadata

    from megatron_doremi import install_check

    assert install_check.check_installed() == []  # this environment is recent enough
    real = importlib.metadata.version
    fake = {"transformers": "4.55.2", "deepspeed": "0.14.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real(name))
    problems = install_check.check_installed()
    assert len(problems) == 2
    assert problems[0].startswith("transformers 4.55.2 is too old: megatron-doremi needs transformers>=4.56")
    assert "dtype=" in problems[0] and problems[1].startswith("deepspeed 0.14.0 is too old")
    # setup.py's install_requires come from the same table
    assert "transformers>=4.56" in install_check.install_requires()
