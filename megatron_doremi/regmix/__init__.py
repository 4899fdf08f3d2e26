"""RegMix (Liu et al. 2024, "Data Mixture as Regression"): find a mixture by regression over tiny proxy runs.

    python -m megatron_doremi.regmix sample --mixture mixture.json --num-runs 64 --out runs/ --base-config proxy.json
    python -m megatron_doremi.regmix train runs/ [--parallel 4 --gpus-per-run 1]    # resumable; or a SLURM array
    python -m megatron_doremi.regmix fit runs/ --target average        # LightGBM, ridge, log-linear; held out
    python -m megatron_doremi.regmix search runs/ --num-candidates 1000000 --top-k 100  # -> runs/domain_weights.json
    python -m megatron_doremi.regmix search runs/ --regressor loglinear --optimizer exact --budget-tokens N --max-epochs 4
    python -m megatron_doremi.regmix reuse --previous w.json --mixture new.json --runs reuse/ --base-config proxy.json

Modules: :mod:`.sample` (prior, Dirichlet proposals, epoch cap, threshold, dedupe), :mod:`.runs` (run directory
layout, the train driver and its seam with ``megatron_doremi.train``, reading ``eval_summary.json``), :mod:`.fit`
(regressors and their held-out scores), :mod:`.loglinear` (Olmix's law), :mod:`.search` (candidate scoring, top-k
average, caps, report), :mod:`.optimize` (exact search on the capped simplex), :mod:`.reuse` and
:mod:`.fingerprint` (re-mixing only changed domains). See docs/mixers.md.
"""
