"""RegMix run directories: layout, writing sampled runs, the ``train`` driver, collecting results.

Layout of ``runs/``::

    runs/manifest.json            sampling arguments, domain names, prefixes, token counts, prior, every run's weights
    runs/run_0000/mixture.json    Mixture JSON (absolute shard prefixes, the run's weights)
    runs/run_0000/config.json     the base run config with the mixture/output keys set (when --base-config given)
    runs/run_0000/train.log       stdout+stderr of the training command (appended per attempt)
    runs/run_0000/eval_summary.json   written by the trainer at the end of the run (see below)
    runs/run_0000/done            marker: the command exited 0 AND eval_summary.json exists
    runs/regmix_fit/              ``regmix fit`` outputs; ``regmix search`` writes next to them

**Seam with the trainer.** ``regmix train`` runs, per run, :func:`build_command` (default
``python -m megatron_doremi.train --config run_XXXX/config.json``) with ``output_dir`` = the run directory; the
trainer must leave ``eval_summary.json`` there. Format read by :func:`read_eval_summary` (the trainer's
``training.evaluation.summarize_eval`` output plus ``step``)::

    {"step": int, "domains": {name: {"loss": float, "ppl": float, "tokens": int}},
     "token_weighted": {"loss": f, ...}, "uniform": {"loss": f, ...}, "worst": {"domain": name, "loss": f}}

Only ``domains.<name>.loss`` is required (a bare number per domain is accepted too); the flat form
``{"token_weighted_loss", "uniform_loss", "worst_loss"}`` is also tolerated. The ``average`` target is the uniform
mean of the per-domain losses, recomputed from ``domains``.
"""

from __future__ import annotations

import copy
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from megatron_doremi.atomic_io import atomic_write_json
from megatron_doremi.regmix.sample import RegmixError
from megatron_doremi.training import exit_codes

__all__ = [
    "DONE_MARKER",
    "EVAL_SUMMARY",
    "MANIFEST",
    "RunResults",
    "TrainReport",
    "atomic_write_json",
    "build_command",
    "collect_results",
    "list_run_dirs",
    "load_manifest",
    "read_eval_summary",
    "run_name",
    "set_dotted",
    "target_losses",
    "target_vector",
    "train_runs",
    "write_runs",
]

MANIFEST = "manifest.json"
EVAL_SUMMARY = "eval_summary.json"
DONE_MARKER = "done"
TRAIN_LOG = "train.log"
TRAIN_MODULE = "megatron_doremi.train"
LAUNCHERS = ("python", "torchrun", "deepspeed")


def run_name(index: int) -> str:
    return f"run_{index:04d}"


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file; RegmixError naming the file (and line) when missing or invalid."""
    from megatron_doremi.json_files import read_json_file

    return read_json_file(path, what, RegmixError)


def set_dotted(obj: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "data.mixture", p)`` sets ``cfg["data"]["mixture"] = p``, creating objects on the way."""
    parts = key.split(".")
    if not all(parts):
        raise RegmixError(f"bad dotted key {key!r}")
    cur = obj
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise RegmixError(f"base config: {'.'.join(parts[: i + 1])} is not an object, cannot set {key}")
        cur = nxt
    cur[parts[-1]] = value


def get_dotted(obj: Mapping[str, Any], key: str) -> Any:
    cur: Any = obj
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


# ---- writing sampled runs -------------------------------------------------------------------------------------------


def proxy_config(
    base: Mapping[str, Any], mixture_path: str, run_dir: str, mixture_key: str, output_key: str
) -> dict[str, Any]:
    """The base run config for one proxy: mixture and output dir set; a non-static mixer replaced by ``static``
    (a proxy trains on its fixed mixture); checkpoint ``save``/``load`` moved into the run dir when set; no HF export.
    """
    cfg = copy.deepcopy(dict(base))
    set_dotted(cfg, mixture_key, mixture_path)
    set_dotted(cfg, output_key, run_dir)
    mixer = cfg.get("mixer")
    if mixer is not None and (
        not isinstance(mixer, dict)
        or mixer.get("type", "static") != "static"
        or mixer.get("weights") is not None
    ):
        cfg["mixer"] = {"type": "static"}
    ckpt = cfg.get("checkpoint")
    if isinstance(ckpt, dict):
        ckpt = dict(ckpt)
        for key in ("save", "load"):
            if ckpt.get(key):
                ckpt[key] = os.path.join(run_dir, "checkpoints")
        if ckpt.get("export_hf"):
            ckpt["export_hf"] = None
        cfg["checkpoint"] = ckpt
    return cfg


def write_runs(
    out_dir: str | os.PathLike[str],
    mixture: Any,
    weights: np.ndarray,
    manifest: dict[str, Any],
    base_config: Mapping[str, Any] | None = None,
    mixture_key: str = "data.mixture",
    output_key: str = "output_dir",
) -> list[Path]:
    """Create ``out_dir/run_XXXX/{mixture.json[, config.json]}`` for each row of ``weights`` [K, D] and
    ``out_dir/manifest.json`` (written last). Refuses a directory that already holds a manifest or run dirs."""
    out = Path(out_dir).absolute()
    if (out / MANIFEST).exists() or list_run_dirs(out, require=False):
        raise RegmixError(f"{out}: already holds sampled runs (manifest.json / run_*); choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    from megatron_doremi.data.mixture import Domain, Mixture

    abs_mix = Mixture(
        [Domain(d.name, tuple(os.path.abspath(p) for p in d.prefixes), d.weight) for d in mixture.domains],
        source=mixture.source,
    )
    dirs = []
    for k, w in enumerate(weights):
        run_dir = out / run_name(k)
        run_dir.mkdir()
        mix_path = run_dir / "mixture.json"
        atomic_write_json(mix_path, abs_mix.with_weights([float(x) for x in w]).to_json_dict())
        if base_config is not None:
            cfg = proxy_config(base_config, str(mix_path), str(run_dir), mixture_key, output_key)
            atomic_write_json(run_dir / "config.json", cfg)
        dirs.append(run_dir)
    atomic_write_json(out / MANIFEST, manifest)
    return dirs


def list_run_dirs(runs_dir: str | os.PathLike[str], require: bool = True) -> list[Path]:
    """Sorted ``run_*`` directories of ``runs_dir`` holding a ``mixture.json``; RegmixError if none and required."""
    root = Path(runs_dir)
    if require and not root.is_dir():
        raise RegmixError(f"{root}: not a directory (expected the output of 'regmix sample')")
    dirs = (
        sorted(p for p in root.glob("run_*") if p.is_dir() and (p / "mixture.json").is_file())
        if root.is_dir()
        else []
    )
    if require and not dirs:
        raise RegmixError(f"{root}: no run_*/mixture.json found (run 'regmix sample' first)")
    return dirs


def load_manifest(runs_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``runs_dir/manifest.json`` with its required keys checked."""
    path = Path(runs_dir) / MANIFEST
    man = read_json(path, "RegMix manifest (written by 'regmix sample')")
    for key in ("domain_names", "prior", "concentrations", "min_weight", "seed"):
        if key not in man:
            raise RegmixError(f"{path}: missing key {key!r}")
    return man


# ---- the train driver -----------------------------------------------------------------------------------------------


def build_command(
    launcher: str,
    config: str,
    run_dir: str,
    gpus: Sequence[str] | None,
    port: int,
    template: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) to train one proxy on ``gpus`` (device ids as CUDA_VISIBLE_DEVICES spells them).

    ``template`` (shell-like, split with shlex) may use ``{config}``, ``{run_dir}``, ``{port}``, ``{gpus}`` (comma
    list, empty without GPUs), ``{num_gpus}`` and ``{python}``; it overrides ``launcher``. Launchers: ``python``
    (one process), ``torchrun`` (``--nproc_per_node`` = GPUs per run), ``deepspeed`` (no ``--include``/``--num_gpus``:
    the deepspeed launcher then takes its devices from ``CUDA_VISIBLE_DEVICES``). With GPUs, ``CUDA_VISIBLE_DEVICES``
    is set to them; ``MASTER_PORT`` is always set to ``port`` (unique among concurrent runs).
    """
    gpu_list = ",".join(str(g) for g in gpus) if gpus else ""
    nproc = len(gpus) if gpus else 1
    env = {"MASTER_PORT": str(port)}
    if gpu_list:
        env["CUDA_VISIBLE_DEVICES"] = gpu_list
    if template is not None:
        fields = {
            "config": config,
            "run_dir": run_dir,
            "port": str(port),
            "gpus": gpu_list,
            "num_gpus": str(nproc),
            "python": sys.executable,
        }
        try:
            argv = [part.format(**fields) for part in shlex.split(template)]
        except (KeyError, IndexError, ValueError) as exc:
            raise RegmixError(
                f"--command: bad placeholder {exc} (known: {{{'}, {'.join(fields)}}})"
            ) from None
        return argv, env
    if launcher == "python":
        argv = [sys.executable, "-m", TRAIN_MODULE, "--config", config]
    elif launcher == "torchrun":
        argv = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", TRAIN_MODULE, "--config", config,
        ]  # fmt: skip
    elif launcher == "deepspeed":
        argv = ["deepspeed", "--master_port", str(port), "--module", TRAIN_MODULE, "--config", config]
    else:
        raise RegmixError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    return argv, env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a launch's MASTER_PORT when no ``--base-port`` is given)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def visible_gpus(ids: Sequence[int], parent: str | None) -> list[str]:
    """Map GPU indices to CUDA_VISIBLE_DEVICES entries: through the parent's mask when one is set (a SLURM
    allocation "4,5" makes index 0 -> "4"), else the index itself."""
    if not parent:
        return [str(i) for i in ids]
    mask = [x.strip() for x in parent.split(",") if x.strip()]
    bad = [i for i in ids if not 0 <= i < len(mask)]
    if bad:
        raise RegmixError(
            f"--gpu-ids: indices {bad} are outside this process's CUDA_VISIBLE_DEVICES={parent!r} "
            f"({len(mask)} GPUs, indices 0..{len(mask) - 1})"
        )
    return [mask[i] for i in ids]


@dataclass
class TrainReport:
    """Outcome of :func:`train_runs`: run names by status, and the failures' messages.

    ``requeued``: runs that exited ``exit_codes.REQUEUE`` (stopped on a signal or time limit after a checkpoint:
    not failed, not done; the next ``regmix train`` resumes them); ``pending``: queued runs not started because a
    run was requeued (the allocation is ending).
    """

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    planned: list[tuple[str, list[str], dict[str, str]]] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def exit_status(self) -> int:
        """FAILED if a run failed, else REQUEUE if one was stopped to be resumed (or left pending), else OK."""
        if self.failed:
            return exit_codes.FAILED
        return exit_codes.REQUEUE if self.requeued or self.pending else exit_codes.OK


def _parse_only(only: Sequence[int] | None, count: int) -> set[int] | None:
    if only is None:
        return None
    bad = [i for i in only if not 0 <= i < count]
    if bad:
        raise RegmixError(f"--only: run indices {bad} out of range (have {count} runs: 0..{count - 1})")
    return set(only)


def train_runs(
    runs_dir: str | os.PathLike[str],
    *,
    parallel: int = 1,
    launcher: str = "python",
    command: str | None = None,
    gpus_per_run: int = 0,
    gpu_ids: Sequence[int] | None = None,
    only: Sequence[int] | None = None,
    dry_run: bool = False,
    base_port: int | None = None,
    poll_s: float = 0.2,
    echo: Callable[[str], None] = print,
) -> TrainReport:
    """Train every run dir with a ``config.json`` and no ``done`` marker, ``parallel`` at a time.

    Each process's output goes to ``run/train.log``; a run is marked ``done`` only when the command exits 0 and the
    run dir then holds ``eval_summary.json``. Failures do not stop the others; they are returned in
    ``report.failed``. GPU sets: slot ``s`` of ``parallel`` gets ``gpus_per_run`` ids starting at ``s *
    gpus_per_run``, taken round-robin from ``gpu_ids`` (default ``0 .. parallel*gpus_per_run - 1``; indices into
    this process's ``CUDA_VISIBLE_DEVICES`` when set), so several runs may share a GPU when ``gpu_ids`` is shorter.
    ``only`` restricts to run indices (a SLURM array task). An ``eval_summary.json`` left by an earlier failed
    attempt is renamed ``eval_summary.json.stale`` before the run starts. A run that exits ``exit_codes.REQUEUE``
    goes to ``report.requeued`` (resumable, not failed) and no further run is started (``report.pending``).
    """
    if parallel < 1:
        raise RegmixError(f"--parallel: must be >= 1, got {parallel}")
    if gpus_per_run < 0:
        raise RegmixError(f"--gpus-per-run: must be >= 0, got {gpus_per_run}")
    dirs = list_run_dirs(runs_dir)
    selected = _parse_only(only, len(dirs))
    report = TrainReport()
    todo: list[Path] = []
    missing_cfg = []
    for k, d in enumerate(dirs):
        if selected is not None and k not in selected:
            continue
        if (d / DONE_MARKER).exists():
            report.skipped.append(d.name)
        elif not (d / "config.json").is_file():
            missing_cfg.append(d.name)
        else:
            todo.append(d)
    if missing_cfg:
        raise RegmixError(
            f"{runs_dir}: run(s) {', '.join(missing_cfg[:5])}{' ...' if len(missing_cfg) > 5 else ''} have no "
            "config.json; re-run 'regmix sample' with --base-config run.json"
        )
    ids = list(gpu_ids) if gpu_ids else list(range(parallel * gpus_per_run))
    if gpus_per_run and not ids:
        raise RegmixError("--gpu-ids: empty")

    parent_mask = os.environ.get("CUDA_VISIBLE_DEVICES")

    def slot_gpus(slot: int) -> list[str] | None:
        if not gpus_per_run:
            return None
        return visible_gpus(
            [ids[(slot * gpus_per_run + j) % len(ids)] for j in range(gpus_per_run)], parent_mask
        )

    def slot_port(slot: int) -> int:
        # A fixed default (29500, DeepSpeed's) collides with any other job on the node: pick a free port per launch.
        return base_port + slot if base_port is not None else free_port()

    def plan(d: Path, slot: int) -> tuple[list[str], dict[str, str]]:
        return build_command(
            launcher, str(d / "config.json"), str(d), slot_gpus(slot), slot_port(slot), command
        )

    if dry_run:
        for i, d in enumerate(todo):
            argv, env = plan(d, i % parallel)
            report.planned.append((d.name, argv, env))
        return report

    running: dict[int, tuple[Path, subprocess.Popen[bytes], IO[str], float]] = {}
    queue = list(todo)
    free = list(range(parallel))
    try:
        while queue or running:
            if report.requeued and queue:  # a run was told to stop (signal / time limit): start no more
                report.pending.extend(d.name for d in queue)
                queue.clear()
            while queue and free:
                slot = free.pop(0)
                d = queue.pop(0)
                argv, env_extra = plan(d, slot)
                (d / DONE_MARKER).unlink(missing_ok=True)
                if (d / EVAL_SUMMARY).exists():  # from an earlier failed attempt: must not count for this one
                    os.replace(d / EVAL_SUMMARY, d / (EVAL_SUMMARY + ".stale"))
                log = open(d / TRAIN_LOG, "a", encoding="utf-8")
                log.write(
                    f"=== regmix train: {time.strftime('%Y-%m-%d %H:%M:%S')} env {env_extra} cmd {shlex.join(argv)}\n"
                )
                log.flush()
                try:
                    proc = subprocess.Popen(
                        argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **env_extra},
                        cwd=os.getcwd(),
                    )
                except OSError as exc:
                    log.close()
                    report.failed[d.name] = f"cannot start {argv[0]!r}: {exc.strerror}"
                    echo(f"[regmix] {d.name}: FAILED to start ({exc.strerror})")
                    free.append(slot)
                    continue
                running[slot] = (d, proc, log, time.time())
                echo(
                    f"[regmix] {d.name}: started (slot {slot}{', GPUs ' + env_extra['CUDA_VISIBLE_DEVICES'] if 'CUDA_VISIBLE_DEVICES' in env_extra else ''})"
                )
            finished = [s for s, (_, p, _, _) in running.items() if p.poll() is not None]
            if not finished:
                time.sleep(poll_s)
                continue
            for slot in finished:
                d, proc, log, t0 = running.pop(slot)
                log.close()
                free.append(slot)
                rc = proc.returncode
                took = time.time() - t0
                if rc == exit_codes.REQUEUE:
                    report.requeued.append(d.name)
                    echo(f"[regmix] {d.name}: stopped after a checkpoint ({exit_codes.describe(rc)})")
                    continue
                if rc != 0:
                    report.failed[d.name] = f"exit status {rc} (see {d / TRAIN_LOG})"
                elif not (d / EVAL_SUMMARY).is_file():
                    report.failed[d.name] = (
                        f"exit status 0 but no {EVAL_SUMMARY} in {d} (see {d / TRAIN_LOG})"
                    )
                else:
                    atomic_write_json(d / DONE_MARKER, {"returncode": 0, "seconds": round(took, 3)})
                    report.trained.append(d.name)
                    echo(f"[regmix] {d.name}: done in {took:.1f} s")
                    continue
                echo(f"[regmix] {d.name}: FAILED, {report.failed[d.name]}")
            free.sort()
    except BaseException:
        for _, proc, _log, _ in running.values():
            proc.terminate()
        for _, proc, log, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        raise
    return report


# ---- collecting results ---------------------------------------------------------------------------------------------


def read_eval_summary(path: str | os.PathLike[str]) -> dict[str, float]:
    """Per-domain validation loss ``{name: loss}`` from a run's ``eval_summary.json`` (format in the module doc)."""
    path = os.fspath(path)
    doc = read_json(path, "eval summary")
    if not isinstance(doc, dict) or "domains" not in doc:
        raise RegmixError(
            f'{path}: missing key "domains" (expected {{"domains": {{name: {{"loss": float}}}}}})'
        )
    domains = doc["domains"]
    if not isinstance(domains, dict) or not domains:
        raise RegmixError(f'{path}: "domains" must be a non-empty object of name -> {{"loss": float}}')
    out: dict[str, float] = {}
    for name, entry in domains.items():
        value = entry.get("loss") if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and "loss" not in entry:
            raise RegmixError(f"{path}: missing key domains.{name}.loss")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise RegmixError(f"{path}: domains.{name}.loss must be a finite number, got {value!r}")
        out[str(name)] = float(value)
    return out


@dataclass
class RunResults:
    """Finished runs: ``names`` (domain order), ``runs`` (run dir names), ``weights`` [N, D] float64, ``losses``
    [N, L] float64 (validation loss per domain named in :attr:`targets`), and the run dirs without results in
    ``unfinished``. ``loss_names`` is empty when the losses are over ``names`` (L = D); a reuse swarm's weights are
    over its coordinates (``names``) while its losses stay over the real domains (``loss_names``)."""

    names: list[str]
    runs: list[str]
    weights: np.ndarray
    losses: np.ndarray
    unfinished: list[str]
    loss_names: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        """Names of the loss columns."""
        return self.loss_names or self.names


def collect_results(runs_dir: str | os.PathLike[str]) -> RunResults:
    """Every run dir with an ``eval_summary.json``: its mixture weights and per-domain losses.

    RegmixError when no run has finished, when two runs have different domain sets (both named), or when an
    eval summary lacks one of its mixture's domains.
    """
    from megatron_doremi.data.mixture import Mixture, MixtureError

    dirs = list_run_dirs(runs_dir)
    names: list[str] | None = None
    first = ""
    runs, ws, ls, unfinished = [], [], [], []
    for d in dirs:
        try:
            mix = Mixture.from_json(d / "mixture.json")
        except MixtureError as exc:
            raise RegmixError(str(exc)) from None
        if names is None:
            names, first = list(mix.names), d.name
        elif list(mix.names) != names:
            raise RegmixError(
                f"runs {first} and {d.name} have different domains: {names} vs {list(mix.names)} "
                "(all runs of one RegMix study must share the domain set)"
            )
        summary = d / EVAL_SUMMARY
        if not summary.is_file():
            unfinished.append(d.name)
            continue
        losses = read_eval_summary(summary)
        missing = [n for n in names if n not in losses]
        if missing:
            raise RegmixError(f"{summary}: no loss for domain(s) {missing} of {d / 'mixture.json'}")
        runs.append(d.name)
        ws.append(mix.weights)
        ls.append([losses[n] for n in names])
    if not runs:
        raise RegmixError(
            f"{runs_dir}: no finished runs (no run_*/{EVAL_SUMMARY}; {len(unfinished)} unfinished): "
            "train them first with 'regmix train'"
        )
    assert names is not None
    weights = np.array(ws, dtype=np.float64)
    losses = np.array(ls, dtype=np.float64)
    groups = _reuse_coordinates(runs_dir, names)
    if groups is None:
        return RunResults(names, runs, weights, losses, unfinished)
    coords = np.stack(
        [weights[:, [names.index(m) for m in members]].sum(axis=1) for members in groups.values()], 1
    )
    return RunResults(list(groups), runs, coords, losses, unfinished, loss_names=names)


def _reuse_coordinates(runs_dir: str | os.PathLike[str], names: list[str]) -> dict[str, list[str]] | None:
    """A reuse swarm's coordinates (manifest ``reuse.coordinates``: coordinate -> member domains), else None."""
    path = Path(runs_dir) / MANIFEST
    if not path.is_file():
        return None
    groups = (read_json(path, "RegMix manifest").get("reuse") or {}).get("coordinates")
    if not groups:
        return None
    unknown = sorted({m for ms in groups.values() for m in ms} - set(names))
    if unknown:
        raise RegmixError(f"{path}: reuse.coordinates name domains {unknown} that the runs' mixtures lack")
    return {str(c): list(ms) for c, ms in groups.items()}


TARGET_AVERAGE = "average"


def target_vector(results: RunResults, target: str) -> np.ndarray:
    """float64 [N]: the target domain's loss per run, or the uniform mean over domains for ``average``."""
    if target == TARGET_AVERAGE:
        return results.losses.mean(axis=1)
    if target not in results.targets:
        raise RegmixError(
            f"--target {target!r} is not a domain of these runs; known: {', '.join(results.targets)} "
            f"(or '{TARGET_AVERAGE}')"
        )
    return results.losses[:, results.targets.index(target)].copy()


def target_losses(results: RunResults, target: str) -> tuple[np.ndarray, list[str]]:
    """(losses [N, K], names): the per-domain losses the target averages (all for ``average``, else one)."""
    if target == TARGET_AVERAGE:
        return results.losses.copy(), list(results.targets)
    target_vector(results, target)  # validates the name
    k = results.targets.index(target)
    return results.losses[:, k : k + 1].copy(), [target]
