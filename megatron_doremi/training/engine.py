"""The training loop: DeepSpeed engine, mixture loader, mixer, per-domain loss, evaluation, checkpoints.

One optimizer step (identical collective sequence on every rank):

1. ``m = mixer.loss_multipliers()`` (float64 [D]) and this rank's micro-batches of the next global batch;
2. all-reduce of the per-domain scored-token counts ``n`` (fp64 [D]); the global normaliser is ``N = sum m*n``;
3. for each micro-batch: ``logits = engine(input_ids).logits`` (the model never computes the loss), then
   ``domain_cross_entropy(..., loss_scale_per_domain=m, normalizer=N / (accum * world))``, ``engine.backward``,
   ``engine.step`` (DeepSpeed divides by the accumulation steps and averages over ranks, so the gradient is that
   of ``sum_global m*loss / N``);
4. all-reduce of the per-domain loss / excess sums and counts; ``mixer.observe`` those global numbers and, when
   it changes its sampling weights, ``loader.set_weights``.

**DoReMi step 2** (``mixer.type == "doremi"``): before each proxy forward, :meth:`Trainer.reference_token_loss`
runs the reference model (:mod:`.reference`: step 1's checkpoint, no grad, replicated or its own ZeRO-3 engine)
on the same micro-batch; the fused loss op then also sums the clipped excess ``max(l_proxy - l_ref, 0)`` per
domain, so the step's single fp64 all-reduce of ``[loss_sum, excess_sum, token_count]`` gives the DoReMi mixer
its global statistics. The multipliers ``m`` of step t come from α_{t-1} (``loss_multipliers()`` once per
step). Every rank feeds the same all-reduced numbers to the same deterministic mixer, so α is bit-identical on
every rank. Rank 0 appends ``doremi_weights.jsonl`` (one line per update, plus step 0 = α_0; truncated to the
checkpoint's step on resume) and writes ``domain_weights.json`` + ``domain_weights.png`` at the end. The mixer
state is part of the checkpoint's client state, so a resumed proxy continues the same α trajectory.
With ``reference: null`` there is no reference forward (debug mode: λ = the proxy's own loss).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from megatron_doremi.data.loader import model_inputs
from megatron_doremi.ops.domain_loss import domain_token_counts
from megatron_doremi.training import dist
from megatron_doremi.training.checkpoint import (
    CheckpointError,
    atomic_write_text,
    checkpoint_world_size,
    find_resume_tag,
    load_checkpoint,
    read_latest,
    save_checkpoint,
)
from megatron_doremi.training.config import EVAL_ALL, ConfigError, RunConfig, eval_enabled
from megatron_doremi.training.divergence import DivergenceError, DivergenceGuard
from megatron_doremi.training.ds_config import resolve_deepspeed_config, zero_stage
from megatron_doremi.training.evaluation import evaluate_domains
from megatron_doremi.training.health import HealthMeter
from megatron_doremi.training.lm_head_loss import domain_loss as lm_head_domain_loss
from megatron_doremi.training.lm_head_loss import logits_from_output
from megatron_doremi.training.lr_schedule import make_lr_scheduler, restore_lr
from megatron_doremi.training.metrics import (
    JsonlLog,
    format_duration,
    format_eval_table,
    stderr_is_tty,
)
from megatron_doremi.training.mixer_eval import update_from_heldout
from megatron_doremi.training.reshard import convert_to_universal, fix_universal_load, universal_ds_config
from megatron_doremi.training.resume_checks import (
    changed_settings,
    check_identity,
    format_value,
    identity_of_checkpoint,
    plan_resume,
    run_identity,
)
from megatron_doremi.training.run_lock import lock_run_dirs, run_lock_dirs
from megatron_doremi.training.signals import ExitGuard
from megatron_doremi.training.tracking import Trackers
from megatron_doremi.training.watchdog import watch_launcher

logger = logging.getLogger("megatron_doremi.train")

__all__ = ["Trainer", "setup_logging"]


def setup_logging(rank: int, verbose: bool = False) -> None:
    """Rank 0 logs INFO to stderr, other ranks WARNING; DeepSpeed's chatter only with ``verbose``."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
        try:
            from deepspeed.utils import logger as ds_logger

            ds_logger.setLevel(logging.WARNING)
        except Exception:  # noqa: BLE001 - logging only
            pass
        logging.getLogger("torch.distributed").setLevel(logging.WARNING)


def _read_json(path: str) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


def _sample_hashes(batch: dict[str, torch.Tensor]) -> list[str]:
    tokens = torch.cat([batch["input_ids"][:, :1], batch["labels"]], dim=1).to(torch.int64).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in tokens]


class Trainer:
    """Builds everything from a :class:`RunConfig` and runs training (``train``) or evaluation (``evaluate``).

    Args:
        cfg: validated run config.
        for_training: False builds the same engine but skips the loader (standalone evaluation).
        verbose: keep DeepSpeed's INFO logs.
    """

    def __init__(self, cfg: RunConfig, for_training: bool = True, verbose: bool = False) -> None:
        self.cfg = cfg
        self.denv = dist.init_distributed()
        self.rank, self.world_size = self.denv.rank, self.denv.world_size
        setup_logging(self.rank, verbose)
        self.device = dist.device()
        self.on_gpu = self.device.type == "cuda"
        self.exit_guard = ExitGuard.from_config(cfg.checkpoint, self.device)  # signals / time limit
        if for_training:
            self.exit_guard.install()  # early: a signal during start-up stops after the first step
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        logger.info(
            "launch: %s, world size %d, device %s, backend %s",
            self.denv.launcher,
            self.world_size,
            self.device,
            torch.distributed.get_backend(),
        )
        self._watchdog = watch_launcher()  # orphaned workers exit when their launcher dies
        if for_training:  # one writer per run directory (collective; RunLockedError on every rank)
            self._locks = lock_run_dirs(run_lock_dirs(cfg.output_dir, cfg.checkpoint.get("save")), self.rank)
        self.guard = DivergenceGuard(cfg.train)
        self._build_data(for_training)
        self._resume_plan = plan_resume(cfg, self.rank, self.world_size) if for_training else None
        self._build_engine()
        self.identity = run_identity(cfg, self.mixture, self.hf_config, self.ds_config)
        self.reference = self._build_reference() if for_training else None
        self.step = 0
        self.metrics = self.eval_log = None
        self.tracker = Trackers({})
        self._last_saved = -1
        self._last_eval: dict[str, Any] | None = None
        self._eval_step = -1

    # ---- construction --------------------------------------------------------------------------------------

    def _build_data(self, for_training: bool) -> None:
        from megatron_doremi.data.blending import BlendSchedule
        from megatron_doremi.data.loader import MixtureDataLoader
        from megatron_doremi.data.mixture import Mixture
        from megatron_doremi.data.run_data import build_run_datasets, sample_targets
        from megatron_doremi.training.mixer_factory import build_mixer

        cfg = self.cfg
        self.mixture = Mixture.load(cfg.data["mixture"])
        self.names = list(self.mixture.names)
        self.num_domains = len(self.names)
        t0 = time.time()
        targets = sample_targets(
            cfg.train_iters, cfg.global_batch_size, cfg.eval["eval_interval"], cfg.eval["eval_iters"]
        )
        self.mixture, self.datasets = build_run_datasets(
            self.mixture, cfg.data, cfg.seq_length, cfg.data_seed, targets
        )
        self.mixer = build_mixer(cfg.mixer, self.mixture)
        logger.info(
            "data: %d domains, sampling weights %s (%s mixer), splits %s, built in %.2fs",
            self.num_domains,
            ", ".join(f"{n}={w:.3f}" for n, w in zip(self.names, self.mixer.sampling_weights())),
            self.mixer.name,
            "/".join(self.datasets),
            time.time() - t0,
        )
        self.loader = None
        if for_training:
            schedule = BlendSchedule(
                [(0, self.mixer.sampling_weights())],
                period=cfg.data["blend_period"],
                mode=cfg.data["blend_mode"],
                names=self.names,
            )
            self.loader = MixtureDataLoader(
                self.datasets["train"],
                schedule,
                cfg.global_batch_size,
                cfg.micro_batch_size,
                rank=self.rank,
                world_size=self.world_size,
            )

    def _build_engine(self) -> None:
        import deepspeed

        from megatron_doremi.training.model import (
            build_model,
            count_parameters,
            model_hidden_size,
            param_groups,
        )

        cfg = self.cfg
        self.ds_config = resolve_deepspeed_config(
            cfg, self.world_size, self.on_gpu, model_hidden_size(cfg.model)
        )
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])
        model = build_model(
            cfg.model,
            self.ds_config,
            seed=cfg.seed,
            activation_checkpointing=cfg.activation_checkpointing,
            fused_lm_head=cfg.fused_lm_head,
        )
        self.vocab_size = int(model.config.vocab_size)
        self.hf_config = model.config.to_dict()
        self.num_params = count_parameters(model)
        self.health = HealthMeter.for_model(
            self.device, self.num_params, self.hf_config, cfg, self.world_size, cfg.health.get("peak_tflops")
        )
        reshard = self._resume_plan is not None and self._resume_plan.reshard
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model),
            config=universal_ds_config(self.ds_config) if reshard else self.ds_config,
            lr_scheduler=make_lr_scheduler(cfg.schedule),
        )
        self.engine = engine
        precision = (
            "bf16"
            if self.ds_config["bf16"]["enabled"]
            else "fp16"
            if self.ds_config["fp16"]["enabled"]
            else "fp32"
        )
        logger.info(
            "model: %.2fM parameters, ZeRO stage %d, %s, micro %d x accum %d x world %d = global %d",
            self.num_params / 1e6,
            zero_stage(self.ds_config),
            precision,
            cfg.micro_batch_size,
            self.grad_accum,
            self.world_size,
            cfg.global_batch_size,
        )

    def _build_reference(self) -> Any:
        """The DoReMi reference model (collective), or None for other mixers and ``reference: null``."""
        spec = self.cfg.mixer
        if spec.get("type") != "doremi" or spec.get("reference") is None:
            return None
        from megatron_doremi.training.reference import ReferenceModel, check_reference

        info = check_reference(
            spec["reference"],
            self.cfg.model,
            self.names,
            self.cfg.seq_length,
            self.cfg.source,
            tokenizer=self.cfg.tokenizer,
        )
        return ReferenceModel.build(
            info,
            self.ds_config,
            self.device,
            self.rank,
            self.cfg.micro_batch_size,
            self.world_size,
        )

    # ---- hooks ---------------------------------------------------------------------------------------------

    def reference_token_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-token loss [mb, L] fp32 of the reference model for ``batch`` (device tensors ``input_ids``,
        ``labels``, ``domain_id``; no grad), or None when the run has no reference model."""
        if self.reference is None:
            return None
        return self.reference.token_loss(
            batch["input_ids"], batch["labels"], batch["domain_id"], self.num_domains, **model_inputs(batch)
        )

    # ---- checkpoint ----------------------------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "domain_names": self.names,
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "mixer": self.mixer.state_dict(),
            "global_batch_size": self.cfg.global_batch_size,
            "seq_length": self.cfg.seq_length,
            "identity": self.identity,
            "divergence": self.guard.state_dict(),
        }

    def save(self) -> None:
        save_dir = self.cfg.checkpoint["save"]
        t0 = time.time()
        with self.exit_guard.doing(f"saving checkpoint global_step{self.step}"):
            if self.cfg.debug.get("save_sleep_s"):  # test aid: a save in progress (tag dir, old `latest`)
                os.makedirs(os.path.join(save_dir, f"global_step{self.step}"), exist_ok=True)
                time.sleep(self.cfg.debug["save_sleep_s"])
            save_checkpoint(
                self.engine,
                save_dir,
                self.step,
                self.client_state(),
                self.rank,
                extra_json={
                    "hf_config.json": self.hf_config,
                    "run_config.json": self.cfg.to_dict(),
                    "ds_config.json": self.ds_config,
                    **self._tokenizer_digest_json(),
                },
                world_size=self.world_size,
                device=self.device,
                keep_last=self.cfg.checkpoint.get("keep_last"),
            )
        self._last_saved = self.step
        logger.info("checkpoint: saved %s/global_step%d in %.1fs", save_dir, self.step, time.time() - t0)

    def _tokenizer_digest_json(self) -> dict[str, Any]:
        """``{"tokenizer_digest.json": {"path", "sha256"}}`` for the checkpoint (a DoReMi proxy checks a
        reference's tokenizer against it), empty without a tokenizer file."""
        if not hasattr(self, "_tok_digest"):
            from megatron_doremi.training.reference import tokenizer_digest

            self._tok_digest = tokenizer_digest(self.cfg.tokenizer)
        return {} if self._tok_digest is None else {"tokenizer_digest.json": self._tok_digest}

    def resume(self, load_dir: str | None = None, tag: str | None = None, module_only: bool = False) -> bool:
        """Collective: load a checkpoint; False when there is none.

        Without arguments (training): the checkpoint :func:`plan_resume` chose (``latest``, else the newest
        complete one). Before anything is loaded, the checkpoint's identity (model, data, mixer, optimizer:
        :mod:`.resume_checks`) must equal this run's (only the model's for evaluation), and a checkpoint saved by
        another number of ranks is resharded through DeepSpeed's universal form (training only). Changed
        settings are logged; the LR is recomputed from the restored scheduler state.
        """
        plan = self._resume_plan if load_dir is None and tag is None else None
        if plan is not None:
            load_dir, tag = plan.load_dir, plan.tag
        else:
            load_dir = load_dir or self.cfg.checkpoint.get("load")
            if not load_dir or (self.loader is not None and tag is None):
                return False  # training without a plan: nothing to resume
            tag = tag or find_resume_tag(load_dir)
            if tag is None:
                return False
        tag_dir = os.path.join(load_dir, tag)
        saved_client = _read_json(os.path.join(tag_dir, "trainer_state.json")) or {}
        saved = identity_of_checkpoint(tag_dir, saved_client)
        if self.loader is None:  # evaluation: only the model must match
            saved = {k: v for k, v in saved.items() if k.startswith("model.")}
        check_identity(saved, self.identity, tag_dir)
        engine_tag = None
        saved_world = checkpoint_world_size(tag_dir)
        if plan is not None and plan.reshard:
            engine_tag = self._universal_tag(tag_dir, tag, saved_world)
        elif saved_world not in (None, self.world_size) and zero_stage(self.ds_config) > 0:
            raise CheckpointError(
                f"{tag_dir} was saved by {saved_world} data-parallel ranks and this process group has "
                f"{self.world_size}: evaluate it with {saved_world} ranks, or export it (tools/export_hf.py) "
                "and evaluate the export (training runs reshard automatically)"
            )
        client = load_checkpoint(
            self.engine, load_dir, tag, self.rank, module_only=module_only, engine_tag=engine_tag
        )
        assert client is not None
        if engine_tag is not None:
            fix_universal_load(self.engine.optimizer, os.path.join(load_dir, engine_tag))
        if client.get("domain_names") not in (None, self.names):
            raise ConfigError(
                f"checkpoint {load_dir} is for domains {client['domain_names']}, this run has {self.names}"
            )
        self.step = int(client.get("step", self.engine.global_steps))
        if not module_only:
            if self.loader is not None and client.get("loader") is not None:
                self.loader.load_state_dict(client["loader"])
            if client.get("mixer") is not None:
                self.mixer.load_state_dict(client["mixer"])
            self.guard.load_state_dict(client.get("divergence"))
            restore_lr(self.engine.lr_scheduler, self.cfg.schedule)
            self._last_saved = self.step
            if self.loader is not None:
                self._log_changes(tag_dir)
        logger.info("checkpoint: resumed from %s/%s at step %d", load_dir, client["tag"], self.step)
        return True

    def _universal_tag(self, tag_dir: str, tag: str, saved_world: int | None) -> str:
        """Collective: rank 0 writes the universal form of ``tag_dir`` (once); returns the tag DeepSpeed reads."""
        from megatron_doremi.training.checkpoint import agree_failures

        if self.rank == 0:
            logger.warning(
                "checkpoint: %s was saved by %s ranks, this run has %d: resharding it through DeepSpeed's "
                "universal checkpoint (%s/universal)",
                tag_dir,
                saved_world,
                self.world_size,
                tag_dir,
            )
        failure = None
        if self.rank == 0:
            try:
                convert_to_universal(tag_dir)
            except Exception as exc:  # noqa: BLE001 - every rank must stop
                failure = f"{type(exc).__name__}: {exc}"
        failures = agree_failures(failure, self.device)
        if failures:
            raise CheckpointError(f"{tag_dir}: converting to a universal checkpoint failed: {failures[0]}")
        return f"{tag}/universal"

    def _log_changes(self, tag_dir: str) -> None:
        """Log the settings that differ from the checkpoint's run (allowed: they were not in its identity)."""
        if self.rank != 0:
            return
        saved = {
            "run": _read_json(os.path.join(tag_dir, "run_config.json")) or {},
            "deepspeed": _read_json(os.path.join(tag_dir, "ds_config.json")) or {},
        }
        now = {"run": self.cfg.to_dict(), "deepspeed": self.ds_config}
        changes = changed_settings(saved, now)
        if changes:
            logger.info(
                "resume: %d setting(s) differ from the checkpoint's run (allowed to change):\n  %s",
                len(changes),
                "\n  ".join(f"{k}: {format_value(a)} -> {format_value(b)}" for k, a, b in changes),
            )
        if self.step > self.cfg.train_iters:
            logger.warning(
                "schedule.train_iters (%d) is below the checkpoint's step (%d): nothing to train",
                self.cfg.train_iters,
                self.step,
            )

    # ---- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics record (identical loss numbers on every rank)."""
        assert self.loader is not None
        engine, dev, D = self.engine, self.device, self.num_domains
        t0 = time.time()
        update_from_heldout(self)  # mixers that learn from held-out losses (Aioli): may set new weights
        lr = float(engine.get_lr()[0])
        mult = self.mixer.loss_multipliers()
        weights = self.mixer.sampling_weights()
        consumed_before = self.loader.consumed_samples
        batches = self.loader.next_batch()
        if len(batches) != self.grad_accum:
            raise RuntimeError(
                f"loader gave {len(batches)} micro-batches, DeepSpeed expects {self.grad_accum}"
            )
        counts = torch.zeros(D, dtype=torch.float64)
        for b in batches:
            counts += domain_token_counts(b["labels"], b["domain_id"], D)
            top = int(b["input_ids"].max())
            if top >= self.vocab_size or int(b["labels"].max()) >= self.vocab_size:
                raise ConfigError(
                    f"data has token id {max(top, int(b['labels'].max()))} >= model vocab_size {self.vocab_size}; "
                    "the shards were made with a different tokenizer, or model.vocab_size is too small"
                )
        counts = dist.all_reduce_sum(counts.to(dev))
        normalizer = float((torch.from_numpy(mult).to(dev) * counts).sum()) / (
            self.grad_accum * self.world_size
        )
        scale = torch.from_numpy(mult).to(device=dev, dtype=torch.float32)
        stats = torch.zeros(3, D, dtype=torch.float64, device=dev)
        if self.cfg.debug.get("dump_samples"):
            self._dump_samples(batches, consumed_before)
        t_data = time.time() - t0
        t_ref = 0.0
        for b in batches:
            input_ids = b["input_ids"].to(dev, non_blocking=True)
            labels = b["labels"].to(dev, non_blocking=True)
            domain_id = b["domain_id"].to(dev, non_blocking=True)
            t1 = time.time()
            extra = model_inputs({**b, "input_ids": input_ids})  # position_ids / attention_mask, if any
            ref = self.reference_token_loss(
                {"input_ids": input_ids, "labels": labels, "domain_id": domain_id, **extra}
            )
            t_ref += time.time() - t1
            logits = engine(input_ids=input_ids, use_cache=False, **extra).logits  # hidden states if fused
            out = lm_head_domain_loss(
                engine,
                logits,
                labels,
                domain_id,
                D,
                ref_token_loss=ref,
                loss_scale_per_domain=scale,
                normalizer=normalizer,
            )
            loss = out.loss
            if self.step + 1 in self.cfg.debug.get("overflow_steps", ()):  # test aid: an fp16-style overflow
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
            stats[0] += out.domain_loss_sum
            stats[1] += out.domain_excess_sum
            stats[2] += out.domain_token_count
            del logits, out
        dist.all_reduce_sum(stats)
        self.step += 1
        grad_norm = engine.get_global_grad_norm()
        stats_np = stats.cpu().numpy()
        loss_sum, token_count = stats_np[0], stats_np[2]
        n_tokens = float(token_count.sum())
        applied = bool(engine.was_step_applied())  # False: DeepSpeed skipped it (overflow / non-finite grad)
        diverged = None
        try:
            bad = self.guard.update(
                self.step, applied, float(loss_sum.sum() / max(n_tokens, 1.0)), _float_or_none(grad_norm)
            )
        except DivergenceError as exc:
            diverged, bad = exc, True
        # the mixer ignores the statistics of skipped / non-finite steps
        if not bad and self.mixer.observe(
            self.step, {"loss_sum": stats_np[0], "excess_sum": stats_np[1], "token_count": stats_np[2]}
        ):
            self.loader.set_weights(self.mixer.sampling_weights())
        step_time = time.time() - t0
        tokens = self.cfg.global_batch_size * self.cfg.seq_length
        mixer_log = self.mixer.log_dict()
        record = {
            "step": self.step,
            "loss": float(loss_sum.sum() / max(n_tokens, 1.0)),
            "objective": float((mult * loss_sum).sum() / max(float((mult * token_count).sum()), 1e-12)),
            "domain_loss": {
                n: (float(s / c) if c > 0 else None) for n, s, c in zip(self.names, loss_sum, token_count)
            },
            "domain_tokens": {n: int(c) for n, c in zip(self.names, token_count)},
            "lr": lr,
            "grad_norm": _float_or_none(grad_norm),
            "skipped": not applied,
            "tokens_per_s": tokens / step_time,
            "step_time_s": step_time,
            "data_time_s": t_data,
            **self.health.step(step_time, t_data),
            **({"reference_time_s": t_ref} if self.reference is not None else {}),
            "consumed_samples": self.loader.consumed_samples,
            "consumed_tokens": self.loader.consumed_samples * self.cfg.seq_length,
            "domain_weights": {n: float(w) for n, w in zip(self.names, weights)},
            **mixer_log,
        }
        if not np.all(mult == 1.0):
            record["loss_multipliers"] = {n: float(m) for n, m in zip(self.names, mult)}
        if "domain_weights" in mixer_log:  # the mixer's own weights (DoReMi: α_t) took the key
            record["sampling_weights"] = {n: float(w) for n, w in zip(self.names, weights)}
        if diverged is not None:
            diverged.metrics = record
            raise diverged
        self._after_step()
        return record

    # ---- DoReMi outputs --------------------------------------------------------------------------------------

    def _after_step(self) -> None:
        """Log the mixer's weights: rank 0's ``doremi_weights.jsonl`` on updates, every rank's debug dump."""
        mixer = self.mixer
        if self._weights_log is not None and getattr(mixer, "last_update_step", None) == self.step:
            self._weights_log.append(mixer.history_record(self.step, time.time()))
        if self.cfg.debug.get("dump_mixer"):
            state = mixer.state_dict()
            rec = {"step": self.step, "rank": self.rank, "mixer": state}
            with open(os.path.join(self.cfg.output_dir, f"mixer_rank{self.rank}.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def _open_weights_log(self, resumed: bool) -> None:
        """Rank 0: open ``doremi_weights.jsonl`` (a fresh run writes α_0 as step 0; a resumed one truncates)."""
        self._weights_log = None
        if self.rank != 0 or not hasattr(self.mixer, "history_record"):
            return
        from megatron_doremi.mixers.weights_io import DomainWeightsLog

        path = os.path.join(self.cfg.output_dir, self._weights_log_name())
        self._weights_log = DomainWeightsLog.open(path, resume_step=self.step if resumed else None)
        if self._weights_log.last_step is None and self.step == 0:
            self._weights_log.append(self.mixer.history_record(0, time.time()))

    def _weights_log_name(self) -> str:
        """The weights log of the run's mixer: ``doremi_weights.jsonl``, or the mixer's ``weights_log_name``."""
        return getattr(self.mixer, "weights_log_name", "doremi_weights.jsonl")

    def _write_domain_weights(self) -> dict[str, str]:
        """Rank 0, end of a run with a dynamic mixer: ``domain_weights.json`` (average and final weights, both
        mixture forms); DoReMi adds its hyper-parameters and the plot, other online mixers (ODM) their state."""
        mixer = self.mixer
        from megatron_doremi.mixers.weights_io import plot_domain_weights, write_domain_weights_json

        out = self.cfg.output_dir
        prefixes = {d.name: list(d.prefixes) for d in self.mixture.domains}
        json_path = os.path.join(out, "domain_weights.json")
        if not hasattr(mixer, "history_record"):
            if not hasattr(mixer, "average_weights"):
                return {}  # static weights: nothing learned
            state = mixer.state_dict()
            extra = {"mixer": mixer.name, "step": self.step, "hparams": state.get("hparams")}
            write_domain_weights_json(
                json_path, self.names, mixer.average_weights, mixer.weights, prefixes=prefixes, extra=extra
            )
            return {"domain_weights_json": json_path}
        if self._weights_log is not None:
            self._weights_log.close()
            self._weights_log = None
        ref = self.cfg.mixer.get("reference")
        extra = (
            mixer.domain_weights_extra(self.step)
            if hasattr(mixer, "domain_weights_extra")
            else {
                "step": self.step,
                "num_updates": int(getattr(mixer, "num_updates", 0)),
                "num_skipped": int(getattr(mixer, "num_skipped", 0)),
                "reference_weights": dict(zip(self.names, mixer.reference_weights.tolist())),
                "sampling_weights": dict(zip(self.names, mixer.proxy_sampling_weights.tolist())),
                "initial_weights": dict(zip(self.names, mixer.initial_weights.tolist())),
                "step_size": mixer.step_size,
                "smoothing": mixer.smoothing,
                "resample": mixer.resample,
                "reference_checkpoint": None if ref is None else ref["checkpoint"],
                "debug_no_reference": ref is None,
            }
        )
        write_domain_weights_json(
            json_path, self.names, mixer.average_weights, mixer.weights, prefixes=prefixes, extra=extra
        )
        paths = {"domain_weights_json": json_path}
        jsonl = os.path.join(out, self._weights_log_name())
        png = os.path.join(out, "domain_weights.png")
        try:
            plot_domain_weights(jsonl, png)
            paths["domain_weights_png"] = png
        except (ValueError, OSError, ImportError) as exc:
            logger.warning("domain weights plot not written: %s", exc)
        return paths

    _weights_log: Any = None

    def _dump_samples(self, batches: list[dict[str, torch.Tensor]], consumed_before: int) -> None:
        path = os.path.join(self.cfg.output_dir, f"samples_rank{self.rank}.jsonl")
        rec = {
            "step": self.step + 1,
            "rank": self.rank,
            "consumed_before": consumed_before,
            "samples": [h for b in batches for h in _sample_hashes(b)],
            "domains": [int(d) for b in batches for d in b["domain_id"].tolist()],
        }
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # ---- evaluation ----------------------------------------------------------------------------------------

    def eval_num_samples(self) -> int | None:
        """Samples per domain per evaluation: ``eval_iters x global_batch_size`` (capped by each split's size);
        None for ``eval_iters: "all"`` (every sample of the split once)."""
        if self.cfg.eval["eval_iters"] == EVAL_ALL:
            return None
        return int(self.cfg.eval["eval_iters"]) * self.cfg.global_batch_size

    def token_bytes(self) -> np.ndarray | None:
        """int64 [vocab]: UTF-8 bytes per token id from ``cfg.tokenizer`` (bits per byte), None without one."""
        if not hasattr(self, "_token_bytes"):
            from megatron_doremi.data.token_bytes import token_byte_lengths_for_path

            path, self._token_bytes = self.cfg.tokenizer, None
            if path is not None:
                try:
                    self._token_bytes = token_byte_lengths_for_path(path, self.vocab_size)
                except (ValueError, OSError) as exc:  # TokenizerError is a ValueError
                    logger.warning("bits per byte disabled: tokenizer %s cannot be read (%s)", path, exc)
        return self._token_bytes

    def evaluate(self, split: str = "valid", on_batch: Any = None) -> dict[str, Any] | None:
        """Collective: per-domain evaluation on ``split``; None when the split does not exist."""
        if split not in self.datasets:
            logger.warning(
                "evaluation skipped: the data split has no %r part (data.split=%r)",
                split,
                self.cfg.data["split"],
            )
            return None
        engine = self.engine
        engine.eval()
        t0 = time.time()

        def forward(input_ids: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
            return logits_from_output(engine, engine(input_ids=input_ids, use_cache=False, **extra).logits)

        try:
            result = evaluate_domains(
                forward,
                self.datasets[split],
                [ds.name for ds in self.datasets[split]],  # a valid_path/test_path has its own domains
                self.eval_num_samples(),
                self.cfg.eval_micro_batch_size,
                self.rank,
                self.world_size,
                self.device,
                on_batch=on_batch,
                token_bytes=self.token_bytes(),
            )
        finally:
            engine.train()
        result = {"step": self.step, "split": split, "eval_time_s": time.time() - t0, **result}
        return result

    def _run_eval(self, final: bool = False) -> None:
        if not eval_enabled(self.cfg.eval):
            return
        result = self.evaluate("valid")
        self._eval_step = self.step
        if result is None:
            return
        self._last_eval = result
        if self.rank == 0:
            assert self.eval_log is not None
            self.eval_log.write(result)
            self.tracker.log_eval(self.step, result)
            if not final:  # the final table is part of the run summary
                self._print(format_eval_table(result, f"eval at step {self.step} ({result['split']})"))

    # ---- the loop ------------------------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _open_logs(self, resumed: bool = False) -> None:
        out = self.cfg.output_dir
        if self.rank == 0:
            os.makedirs(out, exist_ok=True)
            atomic_write_text(
                os.path.join(out, "run_config.json"), json.dumps(self.cfg.to_dict(), indent=1) + "\n"
            )
            atomic_write_text(
                os.path.join(out, "ds_config.json"), json.dumps(self.ds_config, indent=1) + "\n"
            )
            self.metrics = JsonlLog(os.path.join(out, "metrics.jsonl"))
            self.eval_log = JsonlLog(os.path.join(out, "eval.jsonl"))
            # A resumed run continues the logs as if it had never stopped: drop lines past the checkpoint.
            self.metrics.truncate_after(self.step)
            self.eval_log.truncate_after(self.step)
            self.tracker = Trackers.open(
                self.cfg.tracking, out, self.rank, resumed, self.step, self.cfg.to_dict()
            )
            if os.path.exists(os.path.join(out, "diverged.json")):  # an earlier attempt's; this one may not
                os.unlink(os.path.join(out, "diverged.json"))
        for flag, name in (("dump_samples", "samples"), ("dump_mixer", "mixer")):
            if self.cfg.debug.get(flag):
                os.makedirs(out, exist_ok=True)
                JsonlLog(os.path.join(out, f"{name}_rank{self.rank}.jsonl")).truncate_after(self.step)
        dist.barrier()

    def train(self) -> dict[str, Any]:
        """Resume if possible, train to ``train_iters``, evaluate, save, export; returns the run summary."""
        from tqdm import tqdm

        cfg = self.cfg
        resumed = self.resume()
        self._open_logs(resumed)
        self._open_weights_log(resumed)
        self._check_eval_vocab()
        total = cfg.train_iters
        save_dir, save_interval = cfg.checkpoint["save"], cfg.checkpoint["save_interval"]
        eval_interval = cfg.eval["eval_interval"]
        show_bar = self.rank == 0 and cfg.progress_bar and stderr_is_tty()
        self._bar = (
            tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True) if show_bar else None
        )
        t_start, start_step = time.time(), self.step
        last: dict[str, Any] = {}
        tokens_seen = 0
        while self.step < total:
            try:
                last = self.train_step()
            except DivergenceError as exc:
                self._stop_diverged(exc)
                raise
            if cfg.debug["step_sleep_s"]:
                time.sleep(cfg.debug["step_sleep_s"])
            tokens_seen += cfg.global_batch_size * cfg.seq_length
            if self.rank == 0:
                self.metrics.write(last)
                self.tracker.log_train(self.step, last)
                done = self.step - start_step
                eta = (time.time() - t_start) / done * (total - self.step)
                if self._bar is not None:
                    self._bar.update(1)
                    self._bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                if self.step % cfg.log_interval == 0 or self.step == total:
                    grad = "-" if last["grad_norm"] is None else f"{last['grad_norm']:.3f}"
                    self._print(
                        f"step {self.step}/{total} | loss {last['loss']:.4f} | lr {last['lr']:.3e} | grad {grad} | "
                        f"{last['tokens_per_s']:,.0f} tok/s | eta {format_duration(eta)}"
                    )
            if eval_interval and self.step % eval_interval == 0 and self.step < total:
                self._run_eval()
            if save_dir and save_interval and self.step % save_interval == 0:
                self.save()
            stop = self.exit_guard.should_stop() if self.exit_guard.active and self.step < total else None
            if stop:  # every rank agreed (all-reduce) at this step: save it and exit REQUEUE
                return self._stop(stop, last, start_step, time.time() - t_start, tokens_seen)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        train_time = time.time() - t_start
        if self._eval_step != self.step:
            self._run_eval(final=True)
        if save_dir and self._last_saved != self.step:
            self.save()
        export_dir = cfg.checkpoint.get("export_hf")
        if export_dir and save_dir:
            if self.rank == 0:
                from megatron_doremi.training.export import export_hf

                export_hf(
                    os.path.join(save_dir, f"global_step{self.step}"), export_dir, tokenizer=cfg.tokenizer
                )
            dist.barrier()
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "train_time_s": train_time,
            "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
            "consumed_samples": self.loader.consumed_samples if self.loader else None,
            "final_train_loss": last.get("loss"),
            "parameters": self.num_params,
            "world_size": self.world_size,
            "export_hf": export_dir,
            "health": self.health.summary(),
            "skipped_steps": self.guard.skipped,
            "nonfinite_steps": self.guard.nonfinite,
            "diverged": False,
            **self.flops_record(),
        }
        if self.rank == 0:
            out = cfg.output_dir
            if self._last_eval is not None:
                atomic_write_text(
                    os.path.join(out, "eval_summary.json"), json.dumps(self._last_eval, indent=1) + "\n"
                )
            weights_files = self._write_domain_weights()
            if weights_files:
                summary["domain_weights"] = {
                    "average": dict(zip(self.names, self.mixer.average_weights.tolist())),
                    "final": dict(zip(self.names, self.mixer.weights.tolist())),
                }
                summary.update(weights_files)
            atomic_write_text(os.path.join(out, "train_summary.json"), json.dumps(summary, indent=1) + "\n")
            self.tracker.log_summary(self.step, summary)
            self.tracker.close()
            self._final_report(summary)
        dist.barrier()
        self.exit_guard.restore()
        return summary

    def _stop(
        self, reason: str, last: dict[str, Any], start_step: int, train_time: float, tokens_seen: int
    ) -> dict[str, Any]:
        """Collective: the agreed stop (signal / time limit) at ``self.step``: a complete checkpoint of this step,
        ``train_summary.json`` with ``stopped`` (no eval summary, domain weights or export: the run is not done),
        the trackers marked resumable. The caller exits with ``exit_codes.REQUEUE``."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._last_saved != self.step:
            self.save()
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "train_time_s": train_time,
            "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
            "consumed_samples": self.loader.consumed_samples if self.loader else None,
            "final_train_loss": last.get("loss"),
            "parameters": self.num_params,
            "world_size": self.world_size,
            "health": self.health.summary(),
            "skipped_steps": self.guard.skipped,
            "nonfinite_steps": self.guard.nonfinite,
            "diverged": False,
            **self.flops_record(),
            "stopped": {"reason": reason, "step": self.step, "checkpoint": f"global_step{self.step}"},
        }
        if self.rank == 0:
            if self._weights_log is not None:
                self._weights_log.close()
                self._weights_log = None
            atomic_write_text(
                os.path.join(self.cfg.output_dir, "train_summary.json"), json.dumps(summary, indent=1) + "\n"
            )
            self.tracker.log_summary(self.step, summary)
            self.tracker.close(stopped=reason)
            print(
                f"stopped at step {self.step}/{self.cfg.train_iters} on {reason}: checkpoint "
                f"{self.cfg.checkpoint['save']}/global_step{self.step} saved; rerun the same command to resume",
                flush=True,
            )
        dist.barrier()
        self.exit_guard.restore()
        return summary

    def flops_record(self) -> dict[str, Any]:
        """Compute accounting of the run so far (every step since step 0, resumed attempts included):
        :func:`~megatron_doremi.training.flops.run_flops` with the DoReMi reference's forward."""
        from megatron_doremi.training.flops import run_flops

        ref = None
        if self.reference is not None:
            ref = (int(self.reference.num_params), self.reference.info.model_config)
        tokens = self.step * self.cfg.global_batch_size * self.cfg.seq_length
        return run_flops(self.num_params, self.hf_config, self.cfg.seq_length, tokens, reference=ref)

    def _check_eval_vocab(self) -> None:
        """Collective: the validation samples evaluation will read have token ids < vocab_size."""
        if "valid" not in self.datasets or not eval_enabled(self.cfg.eval):
            return
        from megatron_doremi.training.preflight import check_split_vocab

        check_split_vocab(
            self.datasets["valid"],
            self.names,
            "valid",
            self.eval_num_samples() or max(len(ds) for ds in self.datasets["valid"]),
            self.vocab_size,
            self.rank,
            self.world_size,
            self.device,
        )

    def _stop_diverged(self, exc: DivergenceError) -> None:
        """Rank 0: log the diverged step's metrics line and write ``diverged.json`` (why, where, counts)."""
        if self.rank != 0:
            return
        from megatron_doremi.atomic_io import atomic_write_json

        metrics = getattr(exc, "metrics", None)
        if metrics is not None:
            self.metrics.write(metrics)
        save_dir = self.cfg.checkpoint.get("save")
        try:
            last_checkpoint = read_latest(save_dir) if save_dir else None
        except CheckpointError:
            last_checkpoint = None
        record = {**exc.record, "last_checkpoint": last_checkpoint, "output_dir": self.cfg.output_dir}
        atomic_write_json(os.path.join(self.cfg.output_dir, "diverged.json"), record)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        logger.error("%s; the run stops (last complete checkpoint: %s)", exc, last_checkpoint)

    def close(self) -> None:
        """Collective, after :meth:`train` (also after a divergence): release the run locks, stop the
        launcher watchdog, destroy the DeepSpeed engine and the process group."""
        for lock in getattr(self, "_locks", None) or []:
            lock.release()
        self._locks = []
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.stop()
        dist.teardown(self.engine)

    def _final_report(self, summary: dict[str, Any]) -> None:
        loss = summary["final_train_loss"]
        tps = summary["tokens_per_s"]
        lines = [
            "",
            "=" * 60,
            f"training done: step {summary['steps']} ({summary['steps_this_run']} this run) in "
            f"{format_duration(summary['train_time_s'])}, {summary['parameters'] / 1e6:.2f}M parameters, "
            f"world size {summary['world_size']}",
            f"  final train loss {loss:.4f}" if loss is not None else "  no training steps this run",
        ]
        if tps:
            lines.append(f"  throughput {tps:,.0f} tokens/s")
        health = summary["health"]
        if health["tflops_per_gpu"] is not None:
            mfu = "-" if health["mfu"] is None else f"{100 * health['mfu']:.1f}%"
            lines.append(
                f"  {health['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {mfu} ({health['device']}), peak memory "
                f"{health['max_memory_allocated_gb']:.2f} GiB, data wait {100 * health['data_wait_fraction']:.1f}%"
            )
        if self._last_eval is not None:
            lines.append(
                format_eval_table(self._last_eval, f"final evaluation (step {self._last_eval['step']})")
            )
        if "domain_weights" in summary:
            avg, final = summary["domain_weights"]["average"], summary["domain_weights"]["final"]
            width = max(len("domain"), *(len(n) for n in self.names))
            ref = getattr(self.mixer, "reference_weights", None)
            if ref is not None:
                lines.append(f"DoReMi domain weights ({getattr(self.mixer, 'num_updates', 0)} updates)")
                head = f"{'reference':>9}  {'sampling':>9}  {'final α':>9}  {'average ᾱ':>9}"
                lines.append(f"  {'domain':<{width}}  {head}")
                for n, r, p in zip(self.names, ref, self.mixer.proxy_sampling_weights):
                    lines.append(f"  {n:<{width}}  {r:>9.4f}  {p:>9.4f}  {final[n]:>9.4f}  {avg[n]:>9.4f}")
            else:
                lines.append(f"{self.mixer.name} domain weights (sampling weights of the run)")
                lines.append(f"  {'domain':<{width}}  {'final':>9}  {'average':>9}")
                for n in self.names:
                    lines.append(f"  {n:<{width}}  {final[n]:>9.4f}  {avg[n]:>9.4f}")
            lines.append(f"  domain weights: {summary['domain_weights_json']}")
        lines.append(f"  run directory: {self.cfg.output_dir}")
        if summary["export_hf"]:
            lines.append(f"  HF export: {summary['export_hf']}")
        print("\n".join(lines), flush=True)

    _bar: Any = None
