"""The sbatch templates under a fake SLURM allocation: scontrol/srun/deepspeed/torchrun are stubs that record.

Also: SLURM hostlist expansion (a table of real-world forms), the CUDA device of a rank under three SLURM GPU
layouts (simulated environments), and the pre-emption path of the templates: USR1 to the batch shell reaches the
trainer ranks and not the launcher, and an exit status 75 (also when torchrun replaces it by 1) requeues the job.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_doremi.training import exit_codes
from megatron_doremi.training.dist import (
    NodeListError,
    expand_nodelist,
    hostnames,
    local_device_index,
    setup_env,
)

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
# With STUB_RANK set, a launcher stub also plays the job: it starts a "rank" and exits with the rank's status
# (STUB_STATUS_OVERRIDE: with that status instead; torchrun reports 1 whatever its workers returned). The rank
# catches USR1 (records it, exits 75) and starts a "helper" that keeps the default USR1 action (a tracker's service
# process): signalling it would kill it.
LAUNCH = """
if os.environ.get("STUB_RANK"):
    import subprocess
    code = subprocess.Popen([sys.executable, os.environ["STUB_RANK"]]).wait()
    with open(os.environ["STUB_LOG"], "a") as fh:
        fh.write(json.dumps({"cmd": "launcher-end", "rank_status": code}) + "\\n")
    sys.exit(int(os.environ.get("STUB_STATUS_OVERRIDE", code)))
"""
RANK = """import json, os, signal, subprocess, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # USR1 -> SIG_DFL on exec
open(os.environ["STUB_READY"], "w").write(str(os.getpid()))
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.3)  # a signal sent to the helper too would have landed by now
if got and os.environ.get("MEGATRON_DOREMI_EXIT_STATUS_FILE"):  # as the trainer's rank 0 does
    open(os.environ["MEGATRON_DOREMI_EXIT_STATUS_FILE"], "w").write("75\\n")
alive = helper.poll() is None
helper.kill()
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({"cmd": "rank", "signals": got, "helper_alive": alive}) + "\\n")
sys.exit(75 if got else 0)
"""
STUBS = {
    # `scontrol show hostnames LIST`: a fixed expansion of the fake SLURM_JOB_NODELIST below; `scontrol requeue ID`
    # is recorded
    "scontrol": "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf '%s\\n' "
    + " ".join(NODES)
    + "\n"
    + '[ "$1" = requeue ] && echo \'{"cmd": "scontrol", "args": ["requeue", "\'$2\'"]}\' >> "$STUB_LOG"\n'
    + "exit 0\n",
    "deepspeed": "#!/usr/bin/env python3\n" + RECORD + LAUNCH,
    "torchrun": "#!/usr/bin/env python3\n" + RECORD + LAUNCH,
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
        "SLURM_SUBMIT_DIR": str(REPO),  # where sbatch was called: the templates find requeue.sh there
    }

    def run(template: str, *args: str, status: int = 0, **extra: str) -> list[dict]:
        proc = subprocess.run(
            ["bash", str(SLURM / template), *args],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == status, proc.stderr
        return [json.loads(line) for line in log.read_text().splitlines()]

    run.env = env  # type: ignore[attr-defined]
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
        "--master_addr", "node01", "--master_port", str(20000 + 4242 % 20000), "--save_pid",
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


# ---- pre-emption: signal forwarding and requeue -------------------------------------------------------------------


@pytest.mark.parametrize("template", sorted(p.name for p in SLURM.glob("*.sbatch")))
def test_every_template_asks_for_the_warning_signal_and_requeue(template):
    text = (SLURM / template).read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert any(line.startswith("md_run ") for line in body) and body[-1].startswith("md_finish")


def _start_with_ready(fake_slurm, template: str, rank: Path, **extra: str):
    tmp_path, run = fake_slurm
    rank.write_text(RANK)
    ready = tmp_path / "ready"
    env = {**run.env, "STUB_RANK": str(rank), "STUB_READY": str(ready), **extra}
    proc = subprocess.Popen(["bash", str(SLURM / template), *ARGS], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate(timeout=30)
    time.sleep(0.2)  # the rank has its handler (written before the ready file), the shell its trap
    return proc


def _calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_usr1_reaches_the_ranks_not_the_launcher_and_exit_75_requeues(fake_slurm):
    tmp_path, _ = fake_slurm
    proc = _start_with_ready(fake_slurm, "train_deepspeed.sbatch", tmp_path / "rank.py")
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 does: the batch shell only
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exit_codes.REQUEUE, err
    calls = {c["cmd"]: c for c in _calls(tmp_path)}
    # the rank got it, its helper process (default USR1 action) did not, the launcher lived on (it ended with
    # the rank's status)
    assert calls["rank"]["signals"] == [signal.SIGUSR1] and calls["rank"]["helper_alive"]
    assert calls["launcher-end"] == {"cmd": "launcher-end", "rank_status": 75}
    assert calls["scontrol"]["args"] == ["requeue", "4242"]
    assert "requeueing job 4242" in err


def test_term_is_passed_on_as_usr1_and_a_swallowed_75_still_requeues(fake_slurm):
    # torchrun exits 1 whatever its workers returned: the trainer's status file says 75
    tmp_path, _ = fake_slurm
    proc = _start_with_ready(
        fake_slurm, "train_torchrun.sbatch", tmp_path / "rank.py", STUB_STATUS_OVERRIDE="1"
    )
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exit_codes.REQUEUE, err
    calls = _calls(tmp_path)
    rank = next(c for c in calls if c["cmd"] == "rank")
    assert rank["signals"] == [signal.SIGUSR1] and rank["helper_alive"]
    assert [c["args"] for c in calls if c["cmd"] == "scontrol"] == [["requeue", "4242"]]
    assert not list(tmp_path.glob(".mdoremi_status.*"))  # the status file is removed after use


def test_a_finished_run_is_not_requeued(fake_slurm):
    tmp_path, run = fake_slurm
    rank = tmp_path / "rank.py"
    rank.write_text(RANK.replace("deadline = time.time() + 30", "deadline = time.time()"))
    calls = run("train_deepspeed.sbatch", *ARGS, STUB_RANK=str(rank), STUB_READY=str(tmp_path / "ready"))
    assert not [c for c in calls if c["cmd"] == "scontrol"]
    assert next(c for c in calls if c["cmd"] == "rank")["signals"] == []


def test_the_per_node_wrapper_keeps_torchrun_out_of_usr1(tmp_path):
    # executed (not sourced), requeue.sh runs its command with USR1 ignored and hands USR1 to the descendants
    # that handle it: what srun's forwarded signal does on every node of the torchrun template
    ready, log = tmp_path / "ready", tmp_path / "calls.jsonl"
    (tmp_path / "rank.py").write_text(RANK)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import os, subprocess, sys\n"
        "open(os.environ['STUB_READY'] + '.launcher', 'w').write(str(os.getpid()))\n"
        "rank = subprocess.Popen([sys.executable, sys.argv[1]])\n"
        "sys.exit(rank.wait())\n"
    )
    env = {"PATH": os.environ["PATH"], "STUB_READY": str(ready), "STUB_LOG": str(log)}
    cmd = ["bash", str(SLURM / "requeue.sh"), sys.executable, str(launcher), str(tmp_path / "rank.py")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    # slurmstepd may signal every process of the step: the launcher too (it must ignore it), and the wrapper
    os.kill(int(Path(f"{ready}.launcher").read_text()), signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err  # the launcher ignored USR1 and passed the rank's status through
    assert json.loads(log.read_text())["signals"] == [signal.SIGUSR1]


# ---- node lists and devices ----------------------------------------------------------------------------------------

NODELISTS = [
    ("node01", ["node01"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("gpu[01-03,7],cpu5", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("x[8-10]", ["x8", "x9", "x10"]),
    ("n[008-010]-ib", ["n008-ib", "n009-ib", "n010-ib"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("nid[001234-001236,001300]", ["nid001234", "nid001235", "nid001236", "nid001300"]),
    ("a[1-2]b[3,5]c", ["a1b3c", "a1b5c", "a2b3c", "a2b5c"]),
    ("gpu-a100-[1-2],gpu-h100-[10-11]", ["gpu-a100-1", "gpu-a100-2", "gpu-h100-10", "gpu-h100-11"]),
    ("login1.cluster.org,c[1-2].cluster.org", ["login1.cluster.org", "c1.cluster.org", "c2.cluster.org"]),
    ("jwb[0001,0003-0004]", ["jwb0001", "jwb0003", "jwb0004"]),
    ("", []),
]


@pytest.mark.parametrize(("nodelist", "hosts"), NODELISTS)
def test_expand_nodelist_forms(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "bad", ["node[1-3", "node1-3]", "node[[1-2]]", "node[3-1]", "node[a-b]", "node[1,,2]"]
)
def test_expand_nodelist_rejects_bad_syntax(bad):
    with pytest.raises(NodeListError, match="node list"):
        expand_nodelist(bad)


def test_hostnames_prefers_scontrol_and_falls_back(fake_slurm, monkeypatch):
    tmp_path, run = fake_slurm
    monkeypatch.setenv("PATH", run.env["PATH"])  # the stub prints NODES whatever the list says
    assert hostnames("whatever[1-9]") == NODES
    assert hostnames("rack[1-2]-n1", use_scontrol=False) == ["rack1-n1", "rack2-n1"]
    monkeypatch.setenv("PATH", "/nonexistent")
    assert hostnames("rack[1-2]-n1") == ["rack1-n1", "rack2-n1"]
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "rack[1-2]-node[01-02]",
    }
    setup_env(env)
    assert env["MASTER_ADDR"] == "rack1-node01"


def _visible(env: dict[str, str], node_gpus: int) -> int:
    """What torch.cuda.device_count() would say for a CUDA_VISIBLE_DEVICES (all the node's GPUs when unset)."""
    mask = env.get("CUDA_VISIBLE_DEVICES")
    return node_gpus if mask is None else len([d for d in mask.split(",") if d.strip()])


@pytest.mark.parametrize(
    ("layout", "tasks"),
    [
        # --gpus-per-node=8, 8 tasks: every task sees all 8 GPUs
        ("gpus-per-node", [({"SLURM_LOCALID": str(i)}, i) for i in range(8)]),
        # --gpus-per-task=1: SLURM gives each task its own GPU as CUDA_VISIBLE_DEVICES=<one id>: index 0
        ("gpus-per-task", [({"SLURM_LOCALID": str(i), "CUDA_VISIBLE_DEVICES": str(i)}, 0) for i in range(8)]),
        # the site restricts the job to GPUs 4-7 of the node: indices are into that list
        ("site mask", [({"SLURM_LOCALID": str(i), "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, i) for i in range(4)]),
    ],
)
def test_local_device_under_slurm_gpu_layouts(layout, tasks):
    for task_env, expected in tasks:
        env = {
            "SLURM_PROCID": task_env["SLURM_LOCALID"],
            "SLURM_NTASKS": "8",
            "SLURM_JOB_NODELIST": "n1",
            **task_env,
        }
        denv = setup_env(env)
        assert local_device_index(denv.local_rank, _visible(env, node_gpus=8)) == expected, (layout, task_env)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        local_device_index(0, 0)
