"""Quickstart: the sample shipped in ``examples/quickstart/data``, from raw text to a trained model.

    python -m megatron_doremi.quickstart [--out runs/quickstart] [--no-train] [--compare unimax,odm,regmix]

Trains a small byte-level BPE tokenizer on the sample, tokenizes every domain into Megatron ``.bin/.idx``
shards, writes the mixture in both forms, blends the domains and reads batches through the distributed loader
(printing per-domain document/token counts and the blend's realised proportions), then runs the DoReMi pipeline
with a tiny Llama-style model (reference, proxy, main model on the DoReMi weights, baseline on the reference
weights; ``--compare`` adds a main model per other mixing method: heuristics, ODM, RegMix on the sample), each
main model with 2 seeds (``replicates``), and prints the report's headline table: ``mean ± ci95`` over the seeds
and paired-seed verdicts ("no significant difference" is a correct answer for models this small). Steps whose outputs already exist are skipped (``--force`` redoes
the data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_doremi.atomic_io import atomic_write_json
from megatron_doremi.data import preprocess, tokenizer
from megatron_doremi.data.blending import BlendSchedule
from megatron_doremi.data.indexed import IndexedDataset, data_file_path, index_file_path
from megatron_doremi.data.loader import MixtureDataLoader, build_domain_datasets
from megatron_doremi.data.mixture import Domain, Mixture

REPO_DIR = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_DIR / "examples" / "quickstart" / "data"


def prepare_data(
    sample_dir: Path, out: Path, vocab_size: int, workers: int, force: bool, weights: str
) -> Mixture:
    """Tokenizer + one shard per domain; returns the mixture over the shards (token-share or uniform weights)."""
    files = sorted(sample_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"error: no *.jsonl files in {sample_dir}")
    tok_dir = out / "tokenizer"
    if force or not (tok_dir / "tokenizer.json").exists():
        print(f"[1/4] training a {vocab_size}-token byte-level BPE on {len(files)} files -> {tok_dir}")
        args = ["--input", *map(str, files), "--vocab-size", str(vocab_size), "--output-dir", str(tok_dir)]
        if tokenizer.main(args) != 0:
            raise SystemExit("error: tokenizer training failed")
    else:
        print(f"[1/4] tokenizer exists: {tok_dir}")
    domains = []
    for path in files:
        name = path.stem
        prefix = out / "data" / name
        shard = preprocess.output_prefix_for(str(prefix), "text")
        if force or not (os.path.exists(data_file_path(shard)) and os.path.exists(index_file_path(shard))):
            print(f"[2/4] tokenizing domain {name!r}")
            args = ["--input", str(path), "--json-keys", "text", "--output-prefix", str(prefix)]
            args += ["--tokenizer", str(tok_dir), "--append-eod", "--workers", str(workers)]
            if preprocess.main(args) != 0:
                raise SystemExit(f"error: preprocessing {path} failed")
        else:
            print(f"[2/4] shard exists: {shard}")
        domains.append(Domain(name, (shard,), 1.0))
    mixture = Mixture(domains, source="quickstart")
    if weights == "tokens":
        tokens = [IndexedDataset(d.prefixes[0]).num_tokens for d in mixture.domains]
        mixture = mixture.with_weights(tokens)
    return mixture


def blend_summary(
    mixture: Mixture, seq_length: int, split: str, global_batch: int, steps: int, seed: int
) -> None:
    """Print per-domain counts and the realised proportions of ``steps`` global batches read via the loader."""
    data = build_domain_datasets(mixture, seq_length, split, seed=seed)
    train = data["train"]
    print(f"\n{'domain':<12}{'docs':>8}{'tokens':>12}{'train samples/epoch':>22}{'valid samples':>15}")
    for name, domain, tr, va in zip(mixture.names, mixture.domains, train, data["valid"]):
        shard = IndexedDataset(domain.prefixes[0])
        print(f"{name:<12}{shard.num_documents:>8,}{shard.num_tokens:>12,}{len(tr):>22,}{len(va):>15,}")
    loader = MixtureDataLoader(train, BlendSchedule([(0, mixture.weights)]), global_batch, global_batch)
    counts = np.zeros(mixture.num_domains, dtype=np.int64)
    t0 = time.perf_counter()
    for _ in range(steps):
        for micro in loader.next_batch():
            counts += np.bincount(micro["domain_id"].numpy(), minlength=mixture.num_domains)
    elapsed = time.perf_counter() - t0
    total = int(counts.sum())
    print(
        f"\nblend of {total:,} samples (L={seq_length}, {steps} global batches of {global_batch}, seed {seed}):"
    )
    print(f"{'domain':<12}{'weight':>9}{'realised':>10}{'samples':>10}{'epochs':>8}")
    for d, name in enumerate(mixture.names):
        epochs = counts[d] / len(train[d])
        print(f"{name:<12}{mixture.weights[d]:>9.4f}{counts[d] / total:>10.4f}{counts[d]:>10,}{epochs:>8.2f}")
    print(f"read {total / elapsed:,.0f} samples/s through the loader")


PIPELINE_CONFIG = REPO_DIR / "examples" / "quickstart" / "pipeline.json"
COMPARE_CHOICES = (
    "proportional, temperature[:T], unimax[:EPOCHS], odm, aioli, regmix, regmix-loglinear, LABEL=WEIGHTS_FILE"
)
_SWARM = ("regmix", "regmix-loglinear")  # entries that need the RegMix swarm trained first


def parse_compare(text: str) -> dict[str, Any]:
    """``--compare`` -> ``{label: pipeline compare entry}``; ``regmix`` maps to None (RegMix runs first).

    Items (comma-separated): ``proportional``, ``temperature[:T]`` (T = 2), ``unimax[:EPOCHS]`` (1 epoch cap),
    ``odm`` and ``aioli`` (online mixers), ``regmix`` (RegMix on the sample: LightGBM law, sampled search),
    ``regmix-loglinear`` (the same swarm: Olmix's log-linear law, exact search capped at one epoch of each domain
    for the main run's tokens), ``LABEL=PATH`` (any weights file). The two RegMix entries map to None.
    """
    out: dict[str, Any] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, arg = item.partition(":")
        try:
            if "=" in item:
                label, _, path = item.partition("=")
                label, entry = label.strip(), str(Path(path.strip()).resolve())
            elif name in ("proportional", "odm", "aioli", *_SWARM) and not arg:
                label = name
                entry = {
                    "proportional": {"heuristic": "proportional"},
                    "odm": {"mixer": {"type": "odm"}},
                    "aioli": {"mixer": {"type": "aioli"}},
                }.get(name)
            elif name == "temperature":
                label, entry = name, {"heuristic": "temperature", "temperature": float(arg or 2.0)}
            elif name == "unimax":
                label, entry = name, {"heuristic": "unimax", "max_epochs": float(arg or 1.0)}
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--compare: cannot use {item!r}; items are {COMPARE_CHOICES}") from None
        if label in out:
            raise ValueError(f"--compare: {label!r} is given twice")
        out[label] = entry
    return out


def _pipeline_overrides(out: Path, train_iters: int | None) -> list[str]:
    """The quickstart pipeline config's paths made absolute (and its schedule shortened to ``train_iters``)."""
    overrides = [
        f"output_dir={json.dumps(str(out / 'doremi'))}",
        f"base.tokenizer={json.dumps(str(out / 'tokenizer'))}",
        f"base.data.mixture={json.dumps(str(out / 'mixture.json'))}",
        f"base.model={json.dumps(str(REPO_DIR / 'examples' / 'models' / 'tiny.json'))}",
        f"base.deepspeed_config={json.dumps(str(REPO_DIR / 'examples' / 'ds_configs' / 'zero3.json'))}",
    ]
    if train_iters is not None:
        overrides += [
            f"base.schedule.train_iters={train_iters}",
            f"base.schedule.warmup_iters={max(1, train_iters // 10)}",
            f"base.checkpoint.save_interval={max(1, train_iters // 2)}",
            f"base.log_interval={max(1, train_iters // 4)}",
        ]
    return overrides


def run_regmix(out: Path, num_runs: int, iters: int) -> Path:
    """RegMix on the sample: ``num_runs`` proxies of the tiny model (``iters`` steps each) on sampled mixtures,
    a linear fit of the average validation loss, a search; returns ``out/regmix/domain_weights.json``.

    Resumable: an existing ``out/regmix`` keeps its sampled mixtures and skips its finished proxies.
    """
    from megatron_doremi.pipeline import load_pipeline_config
    from megatron_doremi.regmix.__main__ import main as regmix

    runs = out / "regmix"
    if not (runs / "manifest.json").exists():
        cfg, _ = load_pipeline_config(PIPELINE_CONFIG, _pipeline_overrides(out, None))
        base = cfg["base"]
        base["schedule"].update(train_iters=iters, warmup_iters=max(1, iters // 10))
        base.update(checkpoint={"save_interval": 0}, log_interval=max(1, iters // 2), progress_bar=False)
        base["output_dir"] = str(runs / "unused")
        atomic_write_json(out / "regmix_base.json", base)
        print(f"\n[regmix] sampling {num_runs} proxy mixtures -> {runs}", flush=True)
        args = [
            "sample",
            "--mixture",
            str(out / "mixture.json"),
            "--num-runs",
            str(num_runs),
            "--out",
            str(runs),
        ]
        if regmix([*args, "--base-config", str(out / "regmix_base.json"), "--seed", "0"]) != 0:
            raise ValueError("regmix sample failed")
    else:
        print(
            f"\n[regmix] using the proxy mixtures sampled earlier in {runs} (delete it to resample)",
            flush=True,
        )
    print(f"[regmix] training the proxies ({iters} steps each; finished ones are skipped)", flush=True)
    steps = [
        ["train", str(runs)],
        ["fit", str(runs), "--target", "average"],
        ["search", str(runs), "--regressor", "linear", "--num-candidates", "100000", "--top-k", "100"],
    ]
    for args in steps:
        if regmix(args) != 0:
            raise ValueError(f"regmix {args[0]} failed (see {runs})")
    return runs / "domain_weights.json"


def run_doremi(
    out: Path,
    train_iters: int | None,
    echo: bool,
    compare: dict[str, Any] | None = None,
    regmix_runs: int = 16,
    regmix_iters: int = 40,
) -> int:
    """The DoReMi pipeline of ``examples/quickstart/pipeline.json`` on the prepared data, under ``out/doremi``.

    Reference (uniform weights), proxy (Group DRO against it), main model on the averaged weights and a baseline
    on the reference weights, one more main model per ``compare`` entry (:func:`parse_compare`), then
    ``report.md``; the pipeline prints the headline table.
    """
    from megatron_doremi.pipeline import PipelineError, StepFailed, run_pipeline

    overrides = _pipeline_overrides(out, train_iters)
    try:
        if compare:
            compare = dict(compare)
            if any(compare.get(k, "") is None for k in _SWARM):
                weights_file = run_regmix(out, regmix_runs, regmix_iters)
                if "regmix" in compare:
                    compare["regmix"] = str(weights_file)
                if "regmix-loglinear" in compare:
                    law = {"runs": str(weights_file.parent), "regressor": "loglinear", "optimizer": "exact"}
                    compare["regmix-loglinear"] = {"regmix": law}
            overrides.append(f"compare={json.dumps(compare)}")
        what = "reference, proxy, then the main and baseline models once per seed" + (
            f", then {', '.join(compare)}" if compare else ""
        )
        print(f"\n[4/4] DoReMi: {what} (examples/quickstart/pipeline.json)", flush=True)
        run_pipeline(PIPELINE_CONFIG, overrides, echo=echo)
    except (StepFailed, PipelineError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/quickstart", help="output directory")
    parser.add_argument("--sample-dir", default=str(SAMPLE_DIR), help="directory of <domain>.jsonl files")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument(
        "--weights",
        choices=["tokens", "uniform"],
        default="tokens",
        help="mixture weights: token share or uniform",
    )
    parser.add_argument("--split", default="90,5,5", help="train,valid,test document split per domain")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    parser.add_argument("--no-train", dest="train", action="store_false", help="stop after the blend summary")
    parser.add_argument(
        "--train-iters",
        type=int,
        default=None,
        help="steps of every DoReMi run (default: the pipeline config's)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="keep the trainers' output in their train.log only"
    )
    parser.add_argument(
        "--compare",
        default="",
        metavar="LIST",
        help=f"more mixing methods as report columns, comma-separated: {COMPARE_CHOICES} (one main model each)",
    )
    parser.add_argument("--regmix-runs", type=int, default=16, help="proxies for --compare regmix")
    parser.add_argument("--regmix-iters", type=int, default=40, help="steps of each RegMix proxy")
    args = parser.parse_args(argv)
    try:
        compare = parse_compare(args.compare)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out).resolve()  # mixture.json holds absolute prefixes: it loads from any directory
    try:
        (out / "data").mkdir(parents=True, exist_ok=True)
        mixture = prepare_data(
            Path(args.sample_dir), out, args.vocab_size, args.workers, args.force, args.weights
        )
        atomic_write_json(out / "mixture.json", mixture.to_json_dict())
        (out / "data_path.txt").write_text(mixture.to_data_path() + "\n")
        print(f"[3/4] mixture written: {out / 'mixture.json'} (Megatron form: {out / 'data_path.txt'})")
        blend_summary(mixture, args.seq_length, args.split, args.global_batch, args.steps, args.seed)
    except (ValueError, OSError) as exc:  # the project's errors are ValueError subclasses naming file/key
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.train:
        return run_doremi(out, args.train_iters, not args.quiet, compare, args.regmix_runs, args.regmix_iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
