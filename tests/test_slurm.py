"""The sbatch templates under a fake SLURM allocation: scontrol/srun/deepspeed/torchrun are stubs that record."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "examples" / "slurm"
NODES = ["node01", "node02", "gpu7"]

# Each stub appends {"cmd": name, "args": [...], "env": {...}} to $STUB_LOG, one JSON object per line.
RECORD = """import json, os, sys
rec = {"cmd": os.path.basename(sys.argv[0]), "args": sys.argv[1:],
       "env": {k: os.environ.get(k) for k in ("SLURM_NODEID", "SLURM_PROCID")}}
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps(rec) + "\\n")
"""
STUBS = {
    # `scontrol show hostnames LIST`: a fixed expansion of the fake SLURM_JOB_NODELIST below
    "scontrol": "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf '%s\\n' " + " ".join(NODES) + "\n",
    "deepspeed": "#!/usr/bin/env python3\n" + RECORD,
    "torchrun": "#!/usr/bin/env python3\n" + RECORD,
    # srun: record, then run the command once per node like `srun --ntasks-per-node=1` would
    "srun": "#!/usr/bin/env python3\n"
    + RECORD
    + """import subprocess
cmd = [a for a in sys.argv[1:] if not a.startswith("--")]
first = sys.argv[1:].index(cmd[0])
for node in range(int(os.environ["SLURM_NNODES"])):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node))
    subprocess.run(sys.argv[1 + first:], env=env, check=True)
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in STUBS.items():
        path = bindir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02],gpu7",
        "SLURM_NNODES": "3",
        "SLURM_GPUS_ON_NODE": "4",
    }

    def run(template: str, *args: str, **extra: str) -> list[dict]:
        proc = subprocess.run(
            ["bash", str(SLURM / template), *args],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in log.read_text().splitlines()]

    return tmp_path, run


ARGS = ["examples/pile/main.json", "--set", "schedule.lr=1e-4", "--set", "description=two words"]


def test_deepspeed_template_builds_hostfile_and_launcher_command(fake_slurm):
    tmp_path, run = fake_slurm
    calls = run("train_deepspeed.sbatch", *ARGS, RUN_DIR="runs/job")
    assert [c["cmd"] for c in calls] == ["deepspeed"]
    hostfile = tmp_path / "runs" / "job" / "hostfile"
    assert hostfile.read_text() == "node01 slots=4\nnode02 slots=4\ngpu7 slots=4\n"
    assert calls[0]["args"] == [
        "--hostfile", "runs/job/hostfile", "--num_nodes", "3", "--num_gpus", "4",
        "--master_addr", "node01", "--master_port", str(20000 + 4242 % 20000),
        "--module", "megatron_doremi.train", "--config", *ARGS,
    ]  # fmt: skip


def test_torchrun_template_runs_one_torchrun_per_node_without_ssh(fake_slurm):
    _, run = fake_slurm
    calls = run("train_torchrun.sbatch", *ARGS, GPUS_PER_NODE="8", MASTER_PORT="29555")
    assert [c["cmd"] for c in calls] == ["srun", "torchrun", "torchrun", "torchrun"]
    assert calls[0]["args"][:3] == ["--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    expected = [
        "--nnodes", "3", "--nproc_per_node", "8", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "node01:29555", "-m", "megatron_doremi.train", "--config", *ARGS,
    ]  # fmt: skip
    for node, call in enumerate(calls[1:]):
        assert call["args"] == expected
        assert call["env"]["SLURM_NODEID"] == str(node)


def test_templates_fail_without_a_config(fake_slurm):
    tmp_path, _ = fake_slurm
    proc = subprocess.run(
        ["bash", str(SLURM / "train_torchrun.sbatch")], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "usage" in proc.stderr


def test_deepspeed_env_example_is_in_the_launchers_format():
    # deepspeed's runner reads .deepspeed_env line by line with `key, val = line.split("=", 1)`: no comments,
    # no blank lines.
    lines = (SLURM / "deepspeed_env.example").read_text().splitlines()
    assert lines
    for line in lines:
        key, val = line.split("=", maxsplit=1)
        assert key and key == key.strip() and key.replace("_", "").isalnum() and key.isupper(), line
