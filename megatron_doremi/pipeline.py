"""DoReMi end to end: step 1 (reference), step 2 (proxy), step 3 (main model on ᾱ), a baseline, the report.

    python -m megatron_doremi.pipeline --config pipeline.json [--set key=value ...] [--dry-run] [--quiet]

Pipeline config (JSON; relative paths are relative to the current directory, like run configs)::

    {
      "output_dir": "runs/pipeline",
      "launcher": "python",      # | "deepspeed --num_gpus 8" | "torchrun --nproc_per_node 8" | "srun ..." |
                                 #   {"default": ..., "reference": ..., "proxy": ..., "main": ..., "baseline": ..., "compare": ...}
      "rounds": 1,               # iterated DoReMi: round r+1's reference trains on (and its proxy samples with)
                                 #   round r's ᾱ
      "replicates": 1,           # main, baseline and compare models trained with seeds seed, seed+1, ...
                                 #   (replicate i >= 1 under seed<S>/); the report's verdicts pair them by seed
      "proxy_replicates": 1,     # K proxies (seeds seed..seed+K-1) per round; step 3 trains on their mean ᾱ
      "reference_weights": null, # null/"uniform" | "mixture" (the mixture's weights) | [w, ...] | {name: w}
      "baseline": true,          # also train the main model on the reference weights, and compare
      "compare": {},             # more main models, one per other mixing method: {label: spec} (below)
      "export_hf": true,         # HF export of the main and baseline models (<run>/hf)
      "base": {...},             # a run config (docs/training.md) shared by every step
      "reference": {...}, "proxy": {...}, "main": {...}   # per-step overrides, deep-merged into base
    }

A step's ``model`` given as a file or directory replaces the base model; given as an object it is merged into
it (``"main": {"model": {"num_hidden_layers": 24}}``). ``proxy.mixer`` takes the DoReMi options (``step_size``, ``smoothing``, ``initial_weights``, ``warmup_step``,
``update_step``, ``update_times``, ``resample``, ``reference: {"mode", "allow_architecture_mismatch"}``,
``sampling_weights``: what the proxy samples with, default uniform, the same in every round). The
pipeline sets ``output_dir``, ``checkpoint.save/load/export_hf`` and the mixers itself: giving them is an error.
**Comparing methods.** Each ``compare`` entry trains one more main model (``main``'s config, a static mixer on
the entry's weights, or the entry's online mixer) and becomes a column of the report beside DoReMi and the
baseline (``baseline`` must be true: every column's Δ is against it). Labels are ``[A-Za-z0-9][A-Za-z0-9_.-]*``.
An entry is one of::

    "regmix": "runs/regmix/domain_weights.json"      # a weights file: domain_weights.json (DoReMi, RegMix,
                                                     #   heuristics CLI: its "average"), a mixture JSON or {name: w}
    "manual": {"weights": {"code": 0.4, ...}}        # "uniform" | "mixture" | [w, ...] | {name: w} | a file
    "unimax": {"heuristic": "unimax", "max_epochs": 1}   # proportional | temperature (temperature, default 2) |
                                                     #   unimax (max_epochs, default 1; budget_tokens, default
                                                     #   the main run's train_iters x global_batch x seq_length)
    "odm": {"mixer": {"type": "odm", "alpha": 0.9}}  # an online mixer trains the main model itself

Heuristics use the token counts of the main mixture's shards times the training share of ``data.split``.
Step directories: ``reference/``, ``proxy/`` (round 1), ``round<r>/reference/``, ``round<r>/proxy/`` (r >= 2),
``main/``, ``baseline/``, ``compare/<label>/``; each holds ``pipeline_config.json`` (the run config the step was launched with),
``train.log`` and the trainer's outputs. The report (``report.md``, ``report.json``, ``weights.png``,
``loss.png``) goes to ``output_dir``.

**Skip and resume.** A step is *finished* when its ``train_summary.json`` reports ``train_iters`` steps and its
``eval_summary.json`` (when it evaluates) and, for proxies, ``domain_weights.json`` exist. A finished step whose
``pipeline_config.json`` equals the config the pipeline would launch now is skipped; an unfinished one is
launched again and the trainer resumes from its last checkpoint. A step whose directory holds a checkpoint or
results for a *different* config is an error naming the differing keys (delete the directory to retrain it).

Before anything is launched every step's config is validated and the domains of every step's mixture are
compared: steps whose mixtures have different domains are an error.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_doremi.atomic_io import atomic_write_json
from megatron_doremi.json_files import read_json_file
from megatron_doremi.report import MethodResult
from megatron_doremi.training import exit_codes
from megatron_doremi.training.config import eval_enabled
from megatron_doremi.training.run_lock import RunLock, RunLockedError

__all__ = [
    "CompareEntry",
    "PipelineError",
    "Step",
    "StepFailed",
    "build_command",
    "load_pipeline_config",
    "main",
    "read_weights_file",
    "run_pipeline",
]

TRAIN_MODULE = "megatron_doremi.train"
_TRAINER_DEFAULT_SEED = 1234  # the run config's default "seed" (docs/training.md)
STEP_CONFIG = "pipeline_config.json"
KINDS = ("reference", "proxy", "main", "baseline", "compare")
_TOP_KEYS = {
    "description": "",
    "output_dir": None,
    "launcher": "python",
    "rounds": 1,
    "replicates": 1,
    "proxy_replicates": 1,
    "reference_weights": None,
    "baseline": True,
    "compare": {},
    "export_hf": True,
    "base": None,
    "reference": {},
    "proxy": {},
    "main": {},
}
_PROXY_MIXER_KEYS = (
    "step_size",
    "smoothing",
    "initial_weights",
    "warmup_step",
    "update_step",
    "update_times",
    "resample",
    "reference",
    "sampling_weights",
)
_REFERENCE_OPTION_KEYS = ("mode", "allow_architecture_mismatch")
_COMPARE_FORMS = ("weights", "heuristic", "mixer", "regmix")
#: heuristic -> its parameters and their defaults (None: computed from the main run)
HEURISTIC_DEFAULTS: dict[str, dict[str, float | None]] = {
    "proportional": {},
    "temperature": {"temperature": 2.0},
    "unimax": {"max_epochs": 1.0, "budget_tokens": None},
}
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED_LABELS = ("doremi", "baseline", "reference", "proxy", "main", "compare")

#: runner(step_name, command, log_path, env) -> exit status
Runner = Callable[[str, list[str], str, dict[str, str]], int]


class PipelineError(ValueError):
    """A pipeline config or state that cannot be used, or a failed step; the message names the key/step/path."""


class StepFailed(PipelineError):
    """A training step exited non-zero or left incomplete outputs (the message has the log's tail)."""


class StepRequeued(StepFailed):
    """A step stopped after a complete checkpoint (signal or time limit): rerunning the pipeline resumes it."""


@dataclass(frozen=True)
class CompareEntry:
    """A resolved ``compare`` entry: static ``weights`` or an online ``mixer`` spec."""

    label: str
    form: str  # "weights" | "heuristic" | "mixer" | "regmix"
    weights: dict[str, float] | None
    mixer: Mapping[str, Any] | None
    source: str  # what the weights came from, for the report
    search_flops: float | None = None  # a regmix entry's swarm training FLOPs (None: unknown)


def read_weights_file(path: str) -> dict[str, float]:
    """``{name: w}`` from a weights file: a ``domain_weights.json`` (DoReMi, RegMix, the heuristics CLI: its
    ``average``), a mixture JSON (``domains.<name>.weight``) or a plain ``{name: w}`` object; not normalised."""
    doc = _read_json(path, "weights file")
    if isinstance(doc, Mapping):
        block = doc.get("average")
        if isinstance(block, Mapping) and isinstance(block.get("weights"), Mapping):
            return dict(block["weights"])
        if isinstance(doc.get("domains"), Mapping):
            from megatron_doremi.data.mixture import Mixture, MixtureError

            try:
                mix = Mixture.from_dict(doc, source=path, base_dir=os.path.dirname(path) or ".")
            except MixtureError as exc:
                raise PipelineError(str(exc)) from None
            return dict(zip(mix.names, (float(w) for w in mix.weights)))
        if doc and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in doc.values()):
            return dict(doc)
    raise PipelineError(
        f"{path}: not a weights file: expected a domain_weights.json (with average.weights), a mixture JSON "
        "(with domains) or an object {domain: weight}"
    )


@dataclass(frozen=True)
class Step:
    """One training run of the pipeline."""

    name: str  # "reference", "proxy", "round2/reference", ..., "main", "baseline"
    kind: str  # one of KINDS
    round: int | None
    dir: str
    replicate: int = 0  # replicate i trains with seed + i (main, baseline, compare; proxies)


# ---- config ------------------------------------------------------------------------------------------------------


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (objects recursively, everything else replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _inline_model(section: dict[str, Any], where: str) -> dict[str, Any]:
    """Read a ``model`` given as a ``.json`` file so that steps can override single keys of it."""
    from megatron_doremi.training.config import ConfigError, read_json

    model = section.get("model")
    if isinstance(model, str) and model.endswith(".json"):
        try:
            section = {**section, "model": read_json(model, "model config")}
        except ConfigError as exc:
            raise PipelineError(f"{where}.model: {exc}") from None
    return section


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... ({len(keys) - limit} more)")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) or value == "<unset>" else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_pipeline_config(
    config: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], str]:
    """Read (or copy) the pipeline config, apply ``key=value`` overrides, check its keys; returns (config, source)."""
    from megatron_doremi.training.config import ConfigError, apply_overrides, read_json

    try:
        if isinstance(config, Mapping):
            raw, source = copy.deepcopy(dict(config)), "pipeline config"
        else:
            raw, source = read_json(config, "pipeline config"), os.fspath(config)
        if overrides:
            raw = apply_overrides(raw, list(overrides))
            source += " (with --set overrides)"
    except ConfigError as exc:
        raise PipelineError(str(exc)) from None
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(k, list(_TOP_KEYS), n=1) for k in unknown]
        hint = "; ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints)
        )
        raise PipelineError(f"{source}: unknown key(s) {hint}; known: {', '.join(_TOP_KEYS)}")
    cfg = {**copy.deepcopy(_TOP_KEYS), **raw}
    if not isinstance(cfg["output_dir"], str) or not cfg["output_dir"]:
        raise PipelineError(
            f"{source}: output_dir is required (a directory for every step's run and the report)"
        )
    if not isinstance(cfg["base"], dict):
        raise PipelineError(f"{source}: base is required: a run config object shared by every step")
    for key in ("reference", "proxy", "main"):
        if not isinstance(cfg[key], dict):
            raise PipelineError(
                f"{source}: {key} must be an object of run-config overrides, got {cfg[key]!r}"
            )
    rounds = cfg["rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PipelineError(f"{source}: rounds must be an integer >= 1, got {rounds!r}")
    for key in ("replicates", "proxy_replicates"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PipelineError(
                f"{source}: {key} must be an integer >= 1 (seeds seed, seed+1, ...), got {v!r}"
            )
    for key in ("baseline", "export_hf"):
        if not isinstance(cfg[key], bool):
            raise PipelineError(f"{source}: {key} must be true or false, got {cfg[key]!r}")
    cfg["compare"] = _check_compare(cfg["compare"], cfg["baseline"], source)
    _launcher_for(cfg, "reference", source)  # checks the launcher's form
    for where, section in [("base", cfg["base"])] + [(k, cfg[k]) for k in ("reference", "proxy", "main")]:
        if "output_dir" in section:
            raise PipelineError(
                f"{source}: {where}.output_dir: the pipeline sets each step's output_dir itself"
            )
        ckpt = section.get("checkpoint") or {}
        for key in ("save", "load", "export_hf"):
            if key in ckpt:
                raise PipelineError(
                    f"{source}: {where}.checkpoint.{key}: the pipeline sets it (checkpoints go to "
                    "<step dir>/checkpoints; use the top-level export_hf for HF exports)"
                )
        if "mixer" in section and where != "proxy":
            raise PipelineError(
                f"{source}: {where}.mixer: the pipeline sets the mixers (static reference / ᾱ weights, DoReMi for "
                "the proxy); give DoReMi options under proxy.mixer and the reference weights as reference_weights"
            )
    mixer = cfg["proxy"].get("mixer", {})
    if not isinstance(mixer, dict):
        raise PipelineError(f"{source}: proxy.mixer must be an object of DoReMi options")
    bad = sorted(set(mixer) - set(_PROXY_MIXER_KEYS))
    if bad:
        raise PipelineError(
            f"{source}: proxy.mixer: key(s) {bad} cannot be set here (DoReMi options: {', '.join(_PROXY_MIXER_KEYS)}; "
            "the reference weights are the top-level reference_weights)"
        )
    ref_opts = mixer.get("reference", {})
    if not isinstance(ref_opts, dict) or set(ref_opts) - set(_REFERENCE_OPTION_KEYS):
        raise PipelineError(
            f"{source}: proxy.mixer.reference: only {', '.join(_REFERENCE_OPTION_KEYS)} can be set (the "
            "checkpoint is step 1's), got {ref_opts!r}"
        )
    return cfg, source


def _check_compare(value: Any, baseline: bool, source: str) -> dict[str, dict[str, Any]]:
    """The ``compare`` section with every entry as ``{"weights"|"heuristic"|"mixer": ..., params}``."""
    where = f"{source}: compare"
    if not isinstance(value, Mapping):
        raise PipelineError(
            f"{where}: expected an object {{label: weights file | {{weights | heuristic | mixer: ...}}}}, "
            f"got {value!r}"
        )
    if value and not baseline:
        raise PipelineError(
            f"{where}: the compared methods are measured against the baseline: set baseline to true"
        )
    out: dict[str, dict[str, Any]] = {}
    for label, spec in value.items():
        at = f"{where}.{label}"
        if not _LABEL.fullmatch(label) or label.lower() in _RESERVED_LABELS:
            raise PipelineError(
                f"{at}: a label is 1-64 letters, digits, '_', '.' or '-' starting with a letter or digit, and "
                f"not one of {', '.join(_RESERVED_LABELS)}"
            )
        if isinstance(spec, str):
            spec = {"weights": spec}
        if not isinstance(spec, Mapping):
            raise PipelineError(
                f"{at}: expected a weights file path or an object with one of {', '.join(_COMPARE_FORMS)}, "
                f"got {spec!r}"
            )
        forms = [k for k in _COMPARE_FORMS if k in spec]
        if len(forms) != 1:
            raise PipelineError(
                f"{at}: give exactly one of {', '.join(_COMPARE_FORMS)}, got keys {sorted(spec)}"
            )
        form = forms[0]
        allowed = {form}
        if form == "heuristic":
            method = spec["heuristic"]
            if method not in HEURISTIC_DEFAULTS:
                raise PipelineError(
                    f"{at}.heuristic: unknown method {method!r}; known: {', '.join(HEURISTIC_DEFAULTS)}"
                )
            allowed |= set(HEURISTIC_DEFAULTS[method])
            for key in set(HEURISTIC_DEFAULTS[method]) & set(spec):
                v = spec[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise PipelineError(f"{at}.{key}: must be a finite number > 0, got {v!r}")
        unknown = sorted(set(spec) - allowed)
        if unknown:
            params = ", ".join(sorted(allowed - {form})) or "none"
            raise PipelineError(f"{at}: unknown key(s) {unknown} for a {form} entry (parameters: {params})")
        if form == "regmix":
            from megatron_doremi.regmix.compare import check_regmix_spec

            try:
                spec = {"regmix": check_regmix_spec(spec["regmix"], f"{at}.regmix")}
            except ValueError as exc:
                raise PipelineError(str(exc)) from None
        if form == "mixer":
            mixer = spec["mixer"]
            if not isinstance(mixer, Mapping) or not isinstance(mixer.get("type"), str):
                raise PipelineError(
                    f'{at}.mixer: expected a mixer object such as {{"type": "odm"}}, got {mixer!r}'
                )
            if mixer["type"] == "doremi":
                raise PipelineError(
                    f"{at}.mixer: DoReMi needs step 1's reference model; it is the pipeline's own column "
                    "(use rounds / proxy.mixer to vary it)"
                )
        out[str(label)] = copy.deepcopy(dict(spec))
    return out


def _launcher_for(cfg: Mapping[str, Any], kind: str, source: str) -> str:
    launcher = cfg["launcher"]
    if isinstance(launcher, dict):
        unknown = sorted(set(launcher) - {"default", *KINDS})
        if unknown:
            raise PipelineError(
                f"{source}: launcher: unknown key(s) {unknown} (known: default, {', '.join(KINDS)})"
            )
        if kind in ("baseline", "compare") and kind not in launcher:
            kind = "main"  # the baseline and compared runs are the main model on other weights
        launcher = launcher.get(kind, launcher.get("default", "python"))
    if not isinstance(launcher, str) or not launcher.strip():
        raise PipelineError(
            f'{source}: launcher must be a command such as "python", "deepspeed --num_gpus 8" or '
            f'"torchrun --nproc_per_node 8" (or an object of those per step), got {launcher!r}'
        )
    try:
        shlex.split(launcher)
    except ValueError as exc:
        raise PipelineError(f"{source}: launcher {launcher!r}: {exc}") from None
    return launcher


def build_command(launcher: str, config_path: str) -> list[str]:
    """The command line that trains ``config_path`` with ``launcher``.

    The last program in the launcher decides how the trainer is named: ``deepspeed`` -> ``--module
    megatron_doremi.train``; ``torchrun`` -> ``-m megatron_doremi.train``; ``python``/``python3`` (replaced by
    this interpreter) or another ``python*`` path -> ``-m megatron_doremi.train``. A launcher with none of them
    (``srun ...``, ``mpirun ...``) is a prefix of ``<this python> -m megatron_doremi.train``; so
    ``srun --ntasks-per-node 1 torchrun --nproc_per_node 8`` works too.
    """
    tokens = shlex.split(launcher)
    if not tokens:
        raise PipelineError("launcher is empty")
    tail = ["--config", config_path]
    for i in range(len(tokens) - 1, -1, -1):
        prog = os.path.basename(tokens[i])
        if prog == "deepspeed":
            return [*tokens, "--module", TRAIN_MODULE, *tail]
        if prog == "torchrun":
            return [*tokens, "-m", TRAIN_MODULE, *tail]
        if prog in ("python", "python3"):
            return [*tokens[:i], sys.executable, *tokens[i + 1 :], "-m", TRAIN_MODULE, *tail]
        if re.fullmatch(r"python3?(\.\d+)?", prog):
            return [*tokens, "-m", TRAIN_MODULE, *tail]
    return [*tokens, sys.executable, "-m", TRAIN_MODULE, *tail]


# ---- the pipeline ------------------------------------------------------------------------------------------------


def _same_run(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two run configs train the same model (equal apart from output_dir and checkpoint paths)."""

    def strip(cfg: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in cfg.items() if k != "output_dir"}
        out["checkpoint"] = {
            k: v for k, v in (cfg.get("checkpoint") or {}).items() if k not in ("save", "load", "export_hf")
        }
        return out

    return strip(a) == strip(b)


def _read_json(path: str, what: str = "JSON file") -> Any:
    return read_json_file(path, what, PipelineError)


def _subprocess_runner(echo: bool) -> Runner:
    def run(name: str, cmd: list[str], log_path: str, env: dict[str, str]) -> int:
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
            )
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if echo:
                        sys.stdout.write(f"  [{name}] {line}")
                        sys.stdout.flush()
                return proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise

    return run


class _Pipeline:
    def __init__(
        self, cfg: dict[str, Any], source: str, runner: Runner, echo: bool, command: str | None
    ) -> None:
        self.cfg, self.source, self.runner, self.echo, self.command = cfg, source, runner, echo, command
        self.out = cfg["output_dir"]
        self.rounds = int(cfg["rounds"])
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.lock: RunLock | None = None
        self.reused: list[str] = []

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- steps and their configs

    def steps(self) -> list[Step]:
        out = []
        for r in range(1, self.rounds + 1):
            root = self.out if r == 1 else os.path.join(self.out, f"round{r}")
            prefix = "" if r == 1 else f"round{r}/"
            out.append(Step(f"{prefix}reference", "reference", r, os.path.join(root, "reference")))
            for k in range(int(self.cfg["proxy_replicates"])):
                sub = "" if k == 0 else f"seed{self.seed('proxy') + k}/"
                out.append(Step(f"{prefix}{sub}proxy", "proxy", r, os.path.join(root, sub, "proxy"), k))
        for i in range(int(self.cfg["replicates"])):
            sub = "" if i == 0 else f"seed{self.seed('main') + i}/"
            root = os.path.join(self.out, sub)
            out.append(Step(f"{sub}main", "main", None, os.path.join(root, "main"), i))
            if self.cfg["baseline"]:
                out.append(Step(f"{sub}baseline", "baseline", None, os.path.join(root, "baseline"), i))
            for label in self.cfg["compare"]:
                out.append(
                    Step(f"{sub}compare/{label}", "compare", None, os.path.join(root, "compare", label), i)
                )
        return out

    def seed(self, kind: str) -> int:
        """The run seed of step ``kind`` (replicate 0); replicate i trains with seed + i."""
        seed = self.merged(kind).get("seed")
        return int(_TRAINER_DEFAULT_SEED if seed is None else seed)

    def merged(self, kind: str) -> dict[str, Any]:
        """base + the step kind's section (baseline and compared runs use main's), without pipeline-set keys."""
        section = self.cfg["main" if kind in ("baseline", "compare") else kind]
        base = _inline_model(self.cfg["base"], "base")
        section = {k: v for k, v in section.items() if k != "mixer"}
        replace_model = isinstance(
            section.get("model"), str
        )  # a whole model (file or directory) replaces base's
        section = _inline_model(section, kind)
        merged = _deep_merge(base, section)
        if replace_model:
            merged["model"] = section["model"]
        return merged

    def run_config(
        self,
        step: Step,
        weights: dict[str, float] | None,
        reference_dir: str | None = None,
        mixer: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The run config of ``step``: static ``weights`` (reference/main/baseline/compare), DoReMi with
        reference weights ``weights`` and step 1's checkpoint in ``reference_dir`` (proxy), or ``mixer``
        (a compared online mixer)."""
        cfg = self.merged(step.kind)
        ckpt_dir = os.path.join(step.dir, "checkpoints")
        ckpt = dict(cfg.get("checkpoint") or {})
        ckpt.update({"save": ckpt_dir, "load": ckpt_dir})
        if self.cfg["export_hf"] and step.kind in ("main", "baseline", "compare"):
            ckpt["export_hf"] = os.path.join(step.dir, "hf")
        cfg["checkpoint"] = ckpt
        cfg["output_dir"] = step.dir
        if cfg.get("tracking"):  # one tracker group per pipeline, one run per step
            tracking = dict(cfg["tracking"])
            tracking["group"] = tracking.get("group") or os.path.basename(
                os.path.normpath(os.path.abspath(self.out))
            )
            tracking["name"] = step.name.replace("/", "-")
            cfg["tracking"] = tracking
        if step.replicate:  # another initialisation and data order
            cfg["seed"] = self.seed(step.kind) + step.replicate
            data = dict(cfg.get("data") or {})
            if data.get("seed") is not None:
                data["seed"] = int(data["seed"]) + step.replicate
                cfg["data"] = data
        if step.kind == "proxy":
            opts = copy.deepcopy(self.cfg["proxy"].get("mixer", {}))
            sampling = self.sampling_weights(opts.pop("sampling_weights", None))
            if sampling is not None:
                opts["sampling_weights"] = sampling
            ref = {
                **opts.pop("reference", {}),
                "checkpoint": os.path.join(reference_dir or "", "checkpoints"),
            }
            cfg["mixer"] = {"type": "doremi", "reference": ref, "reference_weights": weights, **opts}
        elif mixer is not None:
            cfg["mixer"] = copy.deepcopy(dict(mixer))
        else:
            cfg["mixer"] = {"type": "static", "weights": weights}
        return cfg

    # -- checks before launching anything

    def domain_names(self) -> list[str]:
        """The domains of every step's mixture; PipelineError when they differ between steps."""
        from megatron_doremi.data.mixture import Mixture, MixtureError

        kinds = ["reference", "proxy", "main"]
        found: dict[str, tuple[str, ...]] = {}
        for kind in kinds:
            spec = (self.merged(kind).get("data") or {}).get("mixture")
            if spec is None:
                raise PipelineError(f"{self.source}: {kind}: data.mixture is not set (put it in base.data)")
            try:
                found[kind] = Mixture.load(spec).names
            except MixtureError as exc:
                raise PipelineError(f"{self.source}: {kind}: data.mixture: {exc}") from None
        first = found["reference"]
        for kind in kinds[1:]:
            if found[kind] != first:
                missing = sorted(set(first) - set(found[kind]))
                extra = sorted(set(found[kind]) - set(first))
                raise PipelineError(
                    f"{self.source}: the {kind} step's mixture has domains {list(found[kind])} but the reference "
                    f"step's has {list(first)} (missing {missing}, extra {extra}): every DoReMi step must use the "
                    "same domains"
                )
        return list(first)

    def sampling_weights(self, value: Any) -> dict[str, float] | None:
        """The proxy's ``sampling_weights`` (pipeline ``proxy.mixer.sampling_weights``, default uniform, the same
        in every round) as ``{name: w}``; None when uniform (the trainer's default, so the key is left out)."""
        if value is None or value == "uniform":
            return None
        names = self.domain_names()
        w = self.resolve_weights(value, names, f"{self.source}: proxy.mixer.sampling_weights", "proxy", True)
        return None if max(w.values()) - min(w.values()) <= 1e-12 else w

    def reference_weights(self, names: Sequence[str]) -> dict[str, float]:
        return self.resolve_weights(
            self.cfg["reference_weights"],
            names,
            f"{self.source}: reference_weights",
            "reference",
            positive=True,
        )

    def resolve_weights(
        self, value: Any, names: Sequence[str], where: str, kind: str, positive: bool
    ) -> dict[str, float]:
        """Normalised ``{name: w}`` from ``null``/"uniform", "mixture" (step ``kind``'s mixture), a list in
        domain order, ``{name: w}`` or a weights file (:func:`read_weights_file`); ``positive``: every w > 0."""
        from megatron_doremi.data.mixture import Mixture

        if value is None or value == "uniform":
            return {n: 1.0 / len(names) for n in names}
        if value == "mixture":
            mix = Mixture.load(self.merged(kind)["data"]["mixture"])
            return dict(zip(mix.names, (float(w) for w in mix.weights)))
        if isinstance(value, str):
            where = f"{where} ({value})"
            value = read_weights_file(value)
        if isinstance(value, Mapping):
            missing, extra = sorted(set(names) - set(value)), sorted(set(value) - set(names))
            if missing or extra:
                raise PipelineError(f"{where}: must name every domain; missing {missing}, unknown {extra}")
            values = [value[n] for n in names]
        elif isinstance(value, list):
            if len(value) != len(names):
                raise PipelineError(
                    f"{where}: expected {len(names)} weights in domain order {names}, got {len(value)}"
                )
            values = value
        else:
            raise PipelineError(
                f'{where}: expected null, "uniform", "mixture", a list in domain order, {{name: weight}} or a '
                f"weights file, got {value!r}"
            )
        bound = "> 0" if positive else ">= 0 (not all 0)"
        if (
            any(
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (positive and v == 0)
                for v in values
            )
            or math.fsum(values) <= 0
        ):
            raise PipelineError(f"{where}: every weight must be a finite number {bound}, got {values}")
        total = math.fsum(values)
        return {n: float(v) / total for n, v in zip(names, values)}

    def heuristic_weights(
        self, spec: Mapping[str, Any], names: Sequence[str], where: str
    ) -> dict[str, float]:
        """A heuristic entry's weights from the main mixture's token counts (training share of data.split)."""
        from megatron_doremi.data.mixture import Mixture
        from megatron_doremi.data.sequences import parse_split
        from megatron_doremi.mixers.heuristics import domain_token_counts, heuristic_weights
        from megatron_doremi.training.config import default_value

        main = self.merged("main")
        mixture = Mixture.load(main["data"]["mixture"])
        train_share = parse_split(str((main.get("data") or {}).get("split", default_value("data", "split"))))[
            0
        ]
        tokens = domain_token_counts(mixture).astype(float) * train_share
        method = spec["heuristic"]
        params = {**HEURISTIC_DEFAULTS[method], **{k: v for k, v in spec.items() if k != "heuristic"}}
        if method == "unimax" and params["budget_tokens"] is None:
            sched = main.get("schedule") or {}
            params["budget_tokens"] = float(
                int(sched["train_iters"]) * int(sched["global_batch_size"]) * int(sched["seq_length"])
            )
        try:
            weights = heuristic_weights(method, tokens, **params)
        except ValueError as exc:
            raise PipelineError(f"{where}: {exc}") from None
        return dict(zip(mixture.names, (float(w) for w in weights)))

    def compare_entries(self, names: Sequence[str]) -> dict[str, CompareEntry]:
        """Every ``compare`` entry resolved: static weights (weights, heuristic) or an online mixer."""
        out = {}
        for label, spec in self.cfg["compare"].items():
            where = f"{self.source}: compare.{label}"
            if "mixer" in spec:
                out[label] = CompareEntry(
                    label, "mixer", None, spec["mixer"], f"mixer {spec['mixer']['type']}"
                )
            elif "heuristic" in spec:
                params = ", ".join(f"{k}={v:g}" for k, v in spec.items() if k != "heuristic")
                described = f"heuristic {spec['heuristic']}" + (f" ({params})" if params else "")
                weights = self.heuristic_weights(spec, names, where)
                out[label] = CompareEntry(label, "heuristic", weights, None, described)
            elif "regmix" in spec:
                out[label] = self.regmix_entry(label, spec["regmix"], names, where)
            else:
                value = spec["weights"]
                described = f"weights {value}" if isinstance(value, str) else "weights (given)"
                weights = self.resolve_weights(value, names, f"{where}.weights", "main", positive=False)
                out[label] = CompareEntry(label, "weights", weights, None, described)
        return out

    def regmix_entry(
        self, label: str, opts: Mapping[str, Any], names: Sequence[str], where: str
    ) -> CompareEntry:
        """A ``{"regmix": {...}}`` entry: the swarm searched into ``compare/<label>/regmix_search/``."""
        from megatron_doremi.regmix.compare import regmix_compare_weights
        from megatron_doremi.regmix.runs import RegmixError

        sched = self.merged("main").get("schedule") or {}
        try:
            budget = float(
                int(sched["train_iters"]) * int(sched["global_batch_size"]) * int(sched["seq_length"])
            )
        except (KeyError, TypeError, ValueError):
            budget = None
        out_dir = os.path.join(self.out, "compare", label, "regmix_search")
        try:
            weights, info = regmix_compare_weights(opts, names, out_dir, budget)
        except (RegmixError, OSError) as exc:
            raise PipelineError(f"{where}.regmix: {exc}") from None
        caps = f"; binding caps {', '.join(info['binding_caps'])}" if info["binding_caps"] else ""
        described = (
            f"RegMix {info['regressor']} law, {info['optimizer']} search over {info['swarm_runs']} proxies in "
            f"{opts['runs']}{caps}"
        )
        return CompareEntry(label, "regmix", weights, None, described, search_flops=info["swarm_flops"])

    def step_config(
        self, step: Step, weights: dict[str, float], compare: Mapping[str, CompareEntry], **kw: Any
    ) -> dict[str, Any]:
        """``run_config`` of ``step``; a compared step takes its entry's weights or mixer instead of ``weights``."""
        if step.kind == "compare":
            entry = compare[step.name.rsplit("compare/", 1)[1]]
            return self.run_config(step, entry.weights, mixer=entry.mixer)
        return self.run_config(step, weights, **kw)

    def validate(
        self, names: list[str], ref_weights: dict[str, float], compare: Mapping[str, CompareEntry]
    ) -> None:
        """Validate every step's run config (files, keys, DoReMi options, mixers) before the first launch."""
        from megatron_doremi.training.config import ConfigError, validate_run_config

        for step in self.steps():
            cfg = self.step_config(step, ref_weights, compare, reference_dir=step.dir)
            if step.kind == "proxy":
                cfg["mixer"] = {**cfg["mixer"], "reference": None}  # step 1's checkpoint does not exist yet
            try:
                run = validate_run_config(cfg, f"{self.source}: {step.name}", check_files=True)
            except ConfigError as exc:
                raise PipelineError(str(exc)) from None
            if step.kind in ("main", "baseline", "compare") and self.cfg["baseline"]:
                split = [float(x) for x in str(run.data["split"]).split(",") if x.strip()]
                if not eval_enabled(run.eval) or len(split) < 2 or split[1] <= 0:
                    raise PipelineError(
                        f"{self.source}: {step.name}: the report compares validation losses: set "
                        'eval.eval_iters "all" or >= 1 and a data.split with a validation part (e.g. "90,5,5")'
                    )

    # -- running

    def status(self, step: Step, cfg: Mapping[str, Any]) -> str:
        """ "done" (finished, same config), "resume" (same config, unfinished), "new"; PipelineError on a clash."""
        cfg_path = os.path.join(step.dir, STEP_CONFIG)
        old = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
        finished = self.finished(step, cfg)
        has_state = finished or os.path.isfile(os.path.join(step.dir, "checkpoints", "latest"))
        if old is not None and old != cfg:
            if has_state:
                raise PipelineError(
                    f"{step.dir} holds a {step.name} run of a different config ({_diff(old, cfg)}); "
                    f"delete {step.dir} to retrain it, or use another output_dir"
                )
            return "new"
        if old is None and has_state:
            raise PipelineError(
                f"{step.dir} holds a run that this pipeline did not start (no {STEP_CONFIG}); "
                f"delete it or use another output_dir"
            )
        if finished:
            return "done"
        return "resume" if has_state else "new"

    def finished(self, step: Step, cfg: Mapping[str, Any]) -> bool:
        summary_path = os.path.join(step.dir, "train_summary.json")
        if not os.path.isfile(summary_path):
            return False
        summary = _read_json(summary_path)
        iters = int((cfg.get("schedule") or {}).get("train_iters", -1))
        if not isinstance(summary, dict) or summary.get("steps") != iters:
            return False
        evaluates = eval_enabled(cfg.get("eval") or {})
        if evaluates and not os.path.isfile(os.path.join(step.dir, "eval_summary.json")):
            return False
        return step.kind != "proxy" or os.path.isfile(os.path.join(step.dir, "domain_weights.json"))

    def refuse_diverged(self, step: Step) -> None:
        """PipelineError when ``step`` left a ``diverged.json`` (a proxy that diverged gives no usable weights)."""
        path = os.path.join(step.dir, "diverged.json")
        if os.path.isfile(path):
            record = _read_json(path)
            reason = (
                record.get("reason", "a divergence limit") if isinstance(record, dict) else "see the file"
            )
            raise StepFailed(
                f"step {step.name} diverged ({reason}; {path}): the pipeline does not use its results; fix the "
                f"run (e.g. a lower lr), delete {step.dir} and rerun"
            )

    def check_reference_checkpoint(self, ref: Step, proxy: Step, proxy_cfg: Mapping[str, Any]) -> None:
        """PipelineError when the proxy still has to run but the finished reference's checkpoint is gone."""
        from megatron_doremi.training.checkpoint import list_checkpoints

        if self.status(proxy, proxy_cfg) == "done":
            return
        ckpt = os.path.join(ref.dir, "checkpoints")
        if not (os.path.isfile(os.path.join(ckpt, "latest")) or list_checkpoints(ckpt)):
            raise PipelineError(
                f"the reference run in {ref.dir} finished, but its checkpoint ({ckpt}) was deleted and the proxy "
                f"needs it: restore it, or delete {ref.dir} to retrain the reference"
            )

    def run_step(self, index: int, total: int, step: Step, cfg: dict[str, Any]) -> None:
        label = f"[{index}/{total}] {step.name}"
        state = self.status(step, cfg)
        if state == "done":
            self.refuse_diverged(step)
            print(f"{label}: finished earlier, skipped ({step.dir})", flush=True)
            self.skipped.append(step.name)
            return
        os.makedirs(step.dir, exist_ok=True)
        cfg_path = os.path.join(step.dir, STEP_CONFIG)
        atomic_write_json(cfg_path, cfg)
        cmd = build_command(_launcher_for(self.cfg, step.kind, self.source), cfg_path)
        log_path = os.path.join(step.dir, "train.log")
        verb = "resuming" if state == "resume" else "training"
        print(f"{label}: {verb} -> {step.dir} ({shlex.join(cmd)}; log {log_path})", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.time()
        rc = self.runner(step.name, cmd, log_path, env)
        if rc == exit_codes.REQUEUE:
            raise StepRequeued(
                f"step {step.name} stopped after a checkpoint (signal or time limit); rerun the same command to "
                f"resume it (finished steps are skipped); log {log_path}"
            )
        if rc != 0:
            tail = ""
            if os.path.isfile(log_path):
                with open(log_path, errors="replace") as fh:
                    tail = "".join(fh.readlines()[-15:])
            why = "" if rc == exit_codes.FAILED else f": {exit_codes.describe(rc)}"
            if rc == exit_codes.DIVERGED:
                why += f", see {os.path.join(step.dir, 'diverged.json')}"
                why += "; its weights are not used" if step.kind == "proxy" else ""
            raise StepFailed(f"step {step.name} failed (exit status {rc}{why}); log {log_path}:\n{tail}")
        self.refuse_diverged(step)
        if not self.finished(step, cfg):
            raise StepFailed(
                f"step {step.name} exited 0 but its outputs are incomplete in {step.dir} (train_summary.json with "
                f"{cfg['schedule']['train_iters']} steps, eval_summary.json"
                + (", domain_weights.json" if step.kind == "proxy" else "")
                + ")"
            )
        self.ran.append(step.name)
        print(f"{label}: done in {time.time() - t0:.0f}s", flush=True)

    def costs(
        self, steps: Sequence[Step], runs: Mapping[str, str], compare: Mapping[str, CompareEntry]
    ) -> dict[str, Any]:
        """Training FLOPs (``train_flops`` of each run's ``train_summary.json``, None where absent) and each
        method's search cost as a fraction of one main-model run: DoReMi = its references + proxies, a RegMix
        weights file = the swarm next to it (``run_*/train_summary.json``), others 0."""

        def flops(run_dir: str) -> float | None:
            path = os.path.join(run_dir, "train_summary.json")
            doc = _read_json(path) if os.path.isfile(path) else None
            v = doc.get("train_flops") if isinstance(doc, Mapping) else None
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None

        per_run = {s.name: flops(runs[s.name]) for s in steps}
        main = per_run.get("main")
        search = [per_run[s.name] for s in steps if s.kind in ("reference", "proxy")]
        out: dict[str, Any] = {"train_flops": per_run, "main_run_flops": main, "search_fraction": {}}
        frac = out["search_fraction"]
        frac["DoReMi"] = (
            math.fsum(search) / main if main and all(v is not None for v in search) else None  # type: ignore[misc]
        )
        for label, entry in compare.items():
            if entry.form == "regmix":
                frac[label] = entry.search_flops / main if entry.search_flops is not None and main else None
                continue
            frac[label] = 0.0 if entry.form != "weights" else None
            src = self.cfg["compare"][label].get("weights")
            if isinstance(src, str) and main:
                import glob

                swarm = [
                    flops(os.path.dirname(p))
                    for p in glob.glob(os.path.join(os.path.dirname(src), "run_*", "train_summary.json"))
                ]
                if swarm and all(v is not None for v in swarm):
                    frac[label] = math.fsum(swarm) / main  # type: ignore[arg-type]
        return out

    def method_result(self, step: Step, entry: CompareEntry, names: Sequence[str]) -> MethodResult:
        """A finished compared run for the report; an online mixer's weights are its run's average weights."""
        weights = entry.weights
        if weights is None:
            path = os.path.join(step.dir, "domain_weights.json")
            if os.path.isfile(path):
                weights = self.resolve_weights(path, names, f"{step.name}", "main", positive=False)
        summary = _read_json(os.path.join(step.dir, "eval_summary.json"))
        return MethodResult(
            entry.label, entry.source, weights, summary, step.dir, online=entry.mixer is not None
        )

    def run(self, dry_run: bool = False) -> dict[str, Any]:
        from megatron_doremi.report import RoundWeights, write_report

        names = self.domain_names()
        s1 = self.reference_weights(names)
        compare = self.compare_entries(names)
        self.validate(names, s1, compare)
        steps = self.steps()
        if dry_run:
            for i, step in enumerate(steps, 1):
                launcher = _launcher_for(self.cfg, step.kind, self.source)
                done = self.finished(step, self.merged(step.kind)) if os.path.isdir(step.dir) else False
                if step.kind == "compare":
                    launcher += f"; {compare[step.name.rsplit('compare/', 1)[1]].source}"
                print(f"[{i}/{len(steps)}] {step.name}: {'finished' if done else 'to run'} -> {step.dir} "
                      f"({launcher})")  # fmt: skip
            return {"output_dir": self.out, "steps": {s.name: s.dir for s in steps}, "domain_names": names}
        os.makedirs(self.out, exist_ok=True)
        self.lock = RunLock(self.out, what="pipeline").acquire()  # a second pipeline on output_dir is refused
        atomic_write_json(os.path.join(self.out, "pipeline.json"), self.cfg)
        weights = s1
        rounds: list[RoundWeights] = []
        index = 0
        by_name = {s.name: s for s in steps}
        for r in range(1, self.rounds + 1):
            prefix = "" if r == 1 else f"round{r}/"
            ref = by_name[f"{prefix}reference"]
            index += 1
            self.run_step(index, len(steps), ref, self.run_config(ref, weights))
            proxies = [s for s in steps if s.kind == "proxy" and s.round == r]
            avgs, finals = [], []
            for proxy in proxies:
                index += 1
                proxy_cfg = self.run_config(proxy, weights, reference_dir=ref.dir)
                self.check_reference_checkpoint(ref, proxy, proxy_cfg)
                self.run_step(index, len(steps), proxy, proxy_cfg)
                dw = _read_json(os.path.join(proxy.dir, "domain_weights.json"))
                try:
                    avgs.append({n: float(dw["average"]["weights"][n]) for n in names})
                    finals.append({n: float(dw["final"]["weights"][n]) for n in names})
                except (KeyError, TypeError, ValueError):
                    raise PipelineError(
                        f"{proxy.dir}/domain_weights.json: expected average/final weights for {names}"
                    ) from None
            avg = {n: math.fsum(a[n] for a in avgs) / len(avgs) for n in names}  # the mean of the K ᾱ
            final = {n: math.fsum(f[n] for f in finals) / len(finals) for n in names}
            rounds.append(
                RoundWeights(r, avg, final, proxies[0].dir, ref.dir, dict(weights), proxy_averages=avgs)
            )
            weights = avg
        runs = {s.name: s.dir for s in steps}
        main_evals: list[Any] = []
        base_evals: list[Any] = []
        compare_evals: dict[str, list[Any]] = {label: [] for label in compare}
        compare_steps: dict[str, Step] = {}
        ref1 = by_name["reference"]
        for step in steps:
            if step.kind in ("reference", "proxy"):
                continue
            index += 1
            cfg = self.step_config(step, weights if step.kind == "main" else s1, compare)
            eval_dir = step.dir
            if step.kind == "baseline" and _same_run(cfg, self.run_config(ref1, s1)):
                print(f"[{index}/{len(steps)}] {step.name}: the same run as the reference (model, data, weights, "
                      f"seed, steps): its evaluation is reused ({ref1.dir})", flush=True)  # fmt: skip
                self.reused.append(step.name)
                eval_dir = runs[step.name] = ref1.dir
            else:
                self.run_step(index, len(steps), step, cfg)
            if not self.cfg["baseline"]:
                continue
            summary = _read_json(os.path.join(eval_dir, "eval_summary.json"))
            if step.kind == "main":
                main_evals.append(summary)
            elif step.kind == "baseline":
                base_evals.append(summary)
            else:
                label = step.name.rsplit("compare/", 1)[1]
                compare_evals[label].append(summary)
                compare_steps.setdefault(label, step)
        methods: list[MethodResult] = []
        for label, entry in compare.items():
            m = self.method_result(compare_steps[label], entry, names)
            m.replicates = compare_evals[label]
            methods.append(m)
        main_eval = main_evals or None
        base_eval = base_evals or None
        costs = self.costs(steps, runs, compare)
        report = write_report(
            self.out,
            names,
            s1,
            rounds,
            main_eval,
            base_eval,
            runs=runs,
            command=self.command,
            methods=methods,
            costs=costs,
        )
        print("\n" + report.headline, flush=True)
        print(f"\nreport: {report.report_md}", flush=True)
        return {
            "output_dir": self.out,
            "report_md": report.report_md,
            "report_json": report.report_json,
            "plots": report.plots,
            "headline": report.headline,
            "comparison": report.comparison,
            "method_comparison": report.method_comparison,
            "compare_weights": {m.label: m.weights for m in methods},
            "steps": runs,
            "domain_names": names,
            "reference_weights": s1,
            "doremi_weights": weights,
            "ran": list(self.ran),
            "skipped": list(self.skipped),
            "reused": list(self.reused),
        }


def run_pipeline(
    config: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] | None = None,
    *,
    runner: Runner | None = None,
    echo: bool = True,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the DoReMi pipeline of ``config`` (a pipeline JSON path or dict; see the module docstring).

    ``overrides``: ``["key.sub=JSON value", ...]`` applied to the pipeline config (e.g.
    ``base.schedule.train_iters=50``). ``runner`` replaces the subprocess launcher (tests). ``echo`` copies the
    training output to stdout. Returns the paths (``report_md``, ``report_json``, ``plots``, ``steps``), the
    headline table, the reference and DoReMi weights and which steps ran or were skipped. Raises PipelineError.
    """
    cfg, source = load_pipeline_config(config, list(overrides or ()))
    command = None
    if not isinstance(config, Mapping):
        command = f"python -m megatron_doremi.pipeline --config {config}" + "".join(
            f" --set {shlex.quote(o)}" for o in overrides or ()
        )
    pipe = _Pipeline(cfg, source, runner or _subprocess_runner(echo), echo, command)
    try:
        return pipe.run(dry_run=dry_run)
    finally:
        pipe.release_lock()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_doremi.pipeline",
        description="DoReMi: reference (step 1), proxy (step 2), main model on the DoReMi weights (step 3), "
        "a baseline on the reference weights, and report.md.",
    )
    p.add_argument("--config", required=True, help="pipeline JSON (see docs/doremi.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline config value (dotted key, JSON value), e.g. base.schedule.train_iters=50")  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true", help="check the configs and print the steps; train nothing"
    )
    p.add_argument(
        "--quiet", action="store_true", help="do not echo the training output (it is in train.log)"
    )
    args = p.parse_args(argv)
    try:
        run_pipeline(args.config, args.overrides, echo=not args.quiet, dry_run=args.dry_run)
    except StepRequeued as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exit_codes.REQUEUE
    except RunLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.LOCKED
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
