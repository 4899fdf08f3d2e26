"""Fused per-domain cross-entropy (DESIGN section 5): autograd op, backend dispatch and the plain-torch oracle.

:func:`fused_domain_cross_entropy` (alias :data:`domain_cross_entropy`) has the signature and result of
``megatron_doremi.ops.domain_loss.domain_cross_entropy`` plus two keyword-only options:

* ``inplace_backward=False``: when True the backward pass writes the gradient into the logits' own buffer (one
  read + one write, no new [B, T, V] allocation) and returns that buffer as the logits' gradient. The logits'
  values are destroyed: the caller must not use ``logits`` after ``backward`` (nor may any other autograd node
  need them; such a node then fails with torch's "modified by an inplace operation" error). It falls back to
  out of place when that is unsafe: overlapping memory (expanded / stride-0 logits) or logits that are (a view
  of) a leaf requiring grad, whose ``.grad`` would alias the leaf itself.
* ``check_values=True``: range-check labels / domain ids (see :func:`_check_values`; no host sync on GPU).
* ``backend="auto"``: ``"native"`` = the C++ CPU kernel or the CUDA kernel for the logits' device (raises
  :class:`DomainLossError` when it cannot be built), ``"torch"`` = chunked torch (bounded memory, any device),
  ``"auto"`` = native when it builds (see :mod:`megatron_doremi.ops._build`), else torch with one warning.

Result (:class:`DomainLossOutput`, fields in the order of the plain implementation):

* ``loss``: scalar fp32, differentiable w.r.t. ``logits`` only: ``sum_d scale[d] * domain_loss_sum[d] /
  normalizer``; ``normalizer`` defaults to ``sum_d scale[d] * domain_token_count[d]`` (clamped to >= 1e-12).
* ``token_loss``: [B, T] fp32, ``logsumexp(logits[b, t]) - logits[b, t, labels[b, t]]``, 0 where ignored.
* ``domain_loss_sum`` / ``domain_excess_sum`` / ``domain_token_count``: [D] **fp64** (counts too: exact for
  < 2^53 tokens, and ready to all-reduce into a global normalizer). Excess is ``max(token_loss - ref, 0)``; with
  no ``ref_token_loss`` the reference is 0, so the excess sums equal the loss sums (the plain implementation's
  convention). Every sum is reduced in a fixed order (token -> row -> domain), so repeated calls on the same
  inputs give bit-identical results on every backend.

Non-finite inputs propagate as in torch, on every backend: a NaN logit makes its token's loss NaN (whatever came
before it in the row), a +inf logit a non-finite one, and the excess clip keeps NaN (one expression shared by
the kernels, csrc/domain_loss_common.h, and the torch path, :func:`_clip_excess`), so the per-domain sums are
non-finite and the mixers' skip-on-non-finite guards fire.

Logits may have any float dtype (computed in fp32) and any strides; the native kernels read a strided last
dimension too, but are fastest when it is contiguous (16-byte vector loads on CUDA). Labels are aligned with
the logits (no shift). Gradient: ``scale[d(b)] * (softmax - onehot(label)) / normalizer`` (times the incoming
gradient), written in the logits' dtype; the gradient buffer of the out-of-place backward is contiguous.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch

from megatron_doremi.ops._build import load_cpu_extension, load_cuda_extension

__all__ = [
    "BACKENDS",
    "DomainLossError",
    "DomainLossOutput",
    "domain_cross_entropy",
    "domain_cross_entropy_reference",
    "fused_domain_cross_entropy",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "torch")
# fp32 working set of one chunk of rows in the torch path (two [rows, V] temporaries).
_TORCH_CHUNK_BYTES = 64 * 1024 * 1024


class DomainLossError(ValueError):
    """Inputs of the wrong shape, dtype or range, or an unavailable backend; the message names the argument."""


class DomainLossOutput(NamedTuple):
    """Result of :func:`fused_domain_cross_entropy` (definitions in the module docstring)."""

    loss: torch.Tensor  # scalar fp32, differentiable
    token_loss: torch.Tensor  # [B, T] fp32, detached, 0 at ignored positions
    domain_loss_sum: torch.Tensor  # [D] fp64
    domain_excess_sum: torch.Tensor  # [D] fp64
    domain_token_count: torch.Tensor  # [D] fp64


# --------------------------------------------------------------------------------------------------- validation


def _check_shapes(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    ref_token_loss: torch.Tensor | None,
    loss_scale_per_domain: torch.Tensor | None,
) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise DomainLossError(f"logits: expected [B, T, V], got shape {tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise DomainLossError(f"logits: expected a floating dtype, got {logits.dtype}")
    batch, seq, vocab = logits.shape
    if vocab == 0:
        raise DomainLossError("logits: the vocabulary dimension V must be > 0")
    if tuple(labels.shape) != (batch, seq):
        raise DomainLossError(
            f"labels: expected shape {(batch, seq)} to match logits, got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise DomainLossError(f"labels: expected int64/int32, got {labels.dtype}")
    if tuple(domain_ids.shape) != (batch,):
        raise DomainLossError(f"domain_ids: expected shape {(batch,)}, got {tuple(domain_ids.shape)}")
    if domain_ids.is_floating_point() or domain_ids.is_complex():
        raise DomainLossError(f"domain_ids: expected an integer dtype, got {domain_ids.dtype}")
    if int(num_domains) <= 0:
        raise DomainLossError(f"num_domains: expected > 0, got {num_domains}")
    if ref_token_loss is not None and tuple(ref_token_loss.shape) != (batch, seq):
        raise DomainLossError(
            f"ref_token_loss: expected shape {(batch, seq)}, got {tuple(ref_token_loss.shape)}"
        )
    if loss_scale_per_domain is not None and tuple(loss_scale_per_domain.shape) != (num_domains,):
        raise DomainLossError(
            f"loss_scale_per_domain: expected shape ({num_domains},), got {tuple(loss_scale_per_domain.shape)}"
        )


def _check_values(
    labels: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, vocab: int, ignore_index: int
) -> None:
    """Range checks of labels and domain ids.

    On the CPU: exact, with a message naming the first bad value. On an accelerator: one asynchronous device-side
    assert (``torch._assert_async``, no device->host sync on the hot path); a bad value then fails at the next
    synchronisation with a device-side assertion, as torch's own cross-entropy does. Callers that range-check
    their batches already (the trainer) pass ``check_values=False`` and skip even that.
    """
    if labels.numel() == 0 and domain_ids.numel() == 0:
        return
    bad_label = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    bad_domain = (domain_ids < 0) | (domain_ids >= num_domains)
    if labels.device.type != "cpu":
        torch._assert_async(~(bad_label.any() | bad_domain.any()))
        return
    if bool(bad_domain.any()):
        raise DomainLossError(
            f"domain_ids: values must lie in [0, {num_domains}), got "
            f"[{int(domain_ids.min())}, {int(domain_ids.max())}]"
        )
    if bool(bad_label.any()):
        first = bad_label.nonzero()[0].tolist()
        raise DomainLossError(
            f"labels: values must be {ignore_index} (ignore_index) or lie in [0, {vocab}); "
            f"labels{tuple(first)} = {int(labels[tuple(first)])}"
        )


def _clip_excess(token_loss: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``max(token_loss - ref, 0)`` keeping NaN: the expression of ``mdl_clip_excess`` (csrc/domain_loss_common.h)
    that the C++ and CUDA kernels share, so every backend clips identically."""
    diff = token_loss - ref
    return torch.where(diff < 0, torch.zeros_like(diff), diff)


def _non_overlapping(t: torch.Tensor) -> bool:
    """True when no two elements of ``t`` share memory (a sufficient test: sorted by stride, each dimension of
    size > 1 steps past the whole extent of the smaller ones). False for expanded (stride 0) views."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


def _inplace_allowed(logits: torch.Tensor) -> bool:
    """Whether the backward may write the gradient into the logits' own storage: never into overlapping memory
    (each element would receive several rows' gradients), never into a leaf that requires grad or a view of one
    (its ``.grad`` would alias itself and the parameter's values would be destroyed)."""
    for t in (logits, logits._base):
        if t is not None and t.is_leaf and t.requires_grad:
            return False
    return _non_overlapping(logits)


# ------------------------------------------------------------------------------------------------------ oracle


def domain_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    ref_token_loss: torch.Tensor | None = None,
    loss_scale_per_domain: torch.Tensor | None = None,
    ignore_index: int = -100,
    normalizer: float | torch.Tensor | None = None,
) -> DomainLossOutput:
    """The plain eager composition (log_softmax, gather, subtract, clamp, scatter_add): the tests' oracle.

    Same contract as :func:`fused_domain_cross_entropy`; materialises fp32 [B, T, V] log-probabilities, and its
    ``loss`` is differentiable through ordinary autograd.
    """
    _check_shapes(logits, labels, domain_ids, num_domains, ref_token_loss, loss_scale_per_domain)
    device = logits.device
    labels = labels.to(device=device, dtype=torch.long)
    domain_ids = domain_ids.to(device=device, dtype=torch.long)
    _check_values(labels, domain_ids, num_domains, logits.shape[-1], ignore_index)
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    token_loss = torch.where(valid, nll, torch.zeros_like(nll))
    if loss_scale_per_domain is None:
        scale = torch.ones(num_domains, dtype=torch.float64, device=device)
    else:
        scale = loss_scale_per_domain.detach().to(device=device, dtype=torch.float64)
    row_scale = scale[domain_ids]
    weighted = (token_loss.double() * row_scale[:, None]).sum()
    if normalizer is None:
        norm = (valid.double() * row_scale[:, None]).sum().clamp_min(1e-12)
    else:
        norm = torch.as_tensor(normalizer, dtype=torch.float64, device=device).detach()
    loss = (weighted / norm).float()

    detached = token_loss.detach()
    if ref_token_loss is None:
        excess = detached
    else:
        ref = ref_token_loss.detach().to(device=device, dtype=torch.float32)
        excess = torch.where(valid, _clip_excess(detached, ref), torch.zeros_like(detached))
    zeros = torch.zeros(num_domains, dtype=torch.float64, device=device)
    loss_sum = zeros.clone().scatter_add_(0, domain_ids, detached.double().sum(dim=1))
    excess_sum = zeros.clone().scatter_add_(0, domain_ids, excess.double().sum(dim=1))
    counts = zeros.scatter_add_(0, domain_ids, valid.double().sum(dim=1))
    return DomainLossOutput(loss, detached, loss_sum, excess_sum, counts)


# ---------------------------------------------------------------------------------------------------- backends


class _Backend(Protocol):
    name: str
    dtypes: tuple[torch.dtype, ...] | None  # logits dtypes it handles; None = all

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor,
        ref: torch.Tensor,
        ignore_index: int,
        token_loss: torch.Tensor,
        lse: torch.Tensor,
        loss_sum: torch.Tensor,
        excess_sum: torch.Tensor,
        count: torch.Tensor,
    ) -> None: ...

    def backward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        lse: torch.Tensor,
        row_coef: torch.Tensor,
        ignore_index: int,
        grad: torch.Tensor,
    ) -> None: ...


class _CpuNative:
    """csrc/domain_loss.cpp: one fp32 online-softmax pass per row, rows over at::parallel_for."""

    name = "cpu-native"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def __init__(self, ext: object) -> None:
        self.ext = ext

    def forward(
        self, logits, labels, domain_ids, ref, ignore_index, token_loss, lse, loss_sum, excess_sum, count
    ):
        self.ext.forward(
            logits, labels, domain_ids, ref, ignore_index, token_loss, lse, loss_sum, excess_sum, count
        )

    def backward(self, logits, labels, lse, row_coef, ignore_index, grad):
        self.ext.backward(logits, labels, lse, row_coef, ignore_index, grad)


_NO_KERNEL_IMAGE = "no kernel image"
_cuda_unusable: list[str] = []  # set once when the CUDA module cannot run on this GPU (then: torch path)


def _cuda_fallback(exc: RuntimeError) -> bool:
    """True (after one warning) when ``exc`` says the CUDA module has no code for this GPU's architecture."""
    if _NO_KERNEL_IMAGE not in str(exc):
        return False
    if not _cuda_unusable:
        _cuda_unusable.append(str(exc))
        logger.warning(
            "fused domain loss: the CUDA extension has no kernel for this GPU (%s); using the chunked torch path "
            "from now on (correct, slower). Rebuild with TORCH_CUDA_ARCH_LIST including this GPU's "
            "architecture (or +PTX) to get the kernel.",
            str(exc).strip().splitlines()[-1],
        )
    return True


class _CudaNative:
    """csrc/domain_loss_cuda.cu: one block per row, launched on the current stream of the logits' device.

    A launch that fails with "no kernel image" (a GPU newer than the built architectures, no PTX) falls back to
    the chunked torch path for that call and every later one, with one warning."""

    name = "cuda-native"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, ext: object) -> None:
        self.ext = ext

    def forward(
        self, logits, labels, domain_ids, ref, ignore_index, token_loss, lse, loss_sum, excess_sum, count
    ):
        args = (logits, labels, domain_ids, ref, ignore_index, token_loss, lse, loss_sum, excess_sum, count)
        if _cuda_unusable:
            return _TORCH_BACKEND.forward(*args)
        with torch.cuda.device(logits.device):
            stream = torch.cuda.current_stream(logits.device).cuda_stream
            try:
                self.ext.forward(*args, stream)
            except RuntimeError as exc:
                if not _cuda_fallback(exc):
                    raise
                _TORCH_BACKEND.forward(*args)

    def backward(self, logits, labels, lse, row_coef, ignore_index, grad):
        args = (logits, labels, lse, row_coef, ignore_index, grad)
        if _cuda_unusable:
            return _TORCH_BACKEND.backward(*args)
        with torch.cuda.device(logits.device):
            stream = torch.cuda.current_stream(logits.device).cuda_stream
            try:
                self.ext.backward(*args, stream)
            except RuntimeError as exc:
                if not _cuda_fallback(exc):
                    raise
                _TORCH_BACKEND.backward(*args)


def _row_blocks(tensors: list[torch.Tensor], max_rows: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """(flat_start, flat_end, views [n, V] of each tensor) covering [B, T, V] tensors row-major, never copying."""
    batch, seq, vocab = tensors[0].shape
    rows = batch * seq
    if rows == 0:
        return
    try:
        flats = [t.view(rows, vocab) for t in tensors]
    except RuntimeError:  # B and T not mergeable (e.g. a transposed view): one batch row at a time
        for b in range(batch):
            for s in range(0, seq, max_rows):
                e = min(seq, s + max_rows)
                yield b * seq + s, b * seq + e, [t[b, s:e] for t in tensors]
        return
    for s in range(0, rows, max_rows):
        e = min(rows, s + max_rows)
        yield s, e, [f[s:e] for f in flats]


class _TorchChunked:
    """Plain torch over chunks of rows: bounded extra memory (~_TORCH_CHUNK_BYTES), any device."""

    name = "torch-chunked"
    dtypes = None  # any floating dtype

    @staticmethod
    def _max_rows(vocab: int) -> int:
        return max(1, _TORCH_CHUNK_BYTES // (8 * vocab))

    def forward(
        self, logits, labels, domain_ids, ref, ignore_index, token_loss, lse, loss_sum, excess_sum, count
    ):
        labels_flat = labels.view(-1)
        tl_flat, lse_flat = token_loss.view(-1), lse.view(-1)
        for s, e, (block,) in _row_blocks([logits], self._max_rows(logits.shape[-1])):
            xf = block.float()
            lab = labels_flat[s:e]
            valid = lab != ignore_index
            row_lse = torch.logsumexp(xf, dim=-1)
            target = xf.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
            tl_flat[s:e] = torch.where(valid, row_lse - target, 0.0)
            lse_flat[s:e] = torch.where(valid, row_lse, 0.0)
        valid = labels != ignore_index
        excess = token_loss if ref.numel() == 0 else torch.where(valid, _clip_excess(token_loss, ref), 0.0)
        rows = torch.stack(
            [token_loss.double().sum(1), excess.double().sum(1), valid.double().sum(1)]
        )  # [3, B]
        onehot = domain_ids.unsqueeze(0) == torch.arange(loss_sum.numel(), device=logits.device).unsqueeze(1)
        # [3, D, B] -> [3, D]: a plain (deterministic, atomic-free) reduction over B; where(), not a product with
        # the one-hot mask, so that a NaN row stays in its own domain (NaN * 0 would poison every domain)
        per_domain = torch.where(onehot.unsqueeze(0), rows.unsqueeze(1), 0.0).sum(dim=2)
        loss_sum.copy_(per_domain[0])
        excess_sum.copy_(per_domain[1])
        count.copy_(per_domain[2])

    def backward(self, logits, labels, lse, row_coef, ignore_index, grad):
        seq = logits.shape[1]
        valid = (labels != ignore_index).view(-1)
        coef_flat = (row_coef.repeat_interleave(seq) * valid).view(-1) if seq else row_coef.new_zeros(0)
        lse_flat, labels_flat = lse.view(-1), labels.view(-1)
        for s, e, (block, out) in _row_blocks([logits, grad], self._max_rows(logits.shape[-1])):
            coef = coef_flat[s:e].unsqueeze(1)
            g = torch.exp(block.float() - lse_flat[s:e].unsqueeze(1)).mul_(coef)
            g.scatter_add_(1, torch.where(valid[s:e], labels_flat[s:e], 0).unsqueeze(1), -coef)
            out.copy_(torch.where(coef != 0, g, 0.0))


_TORCH_BACKEND = _TorchChunked()


def resolve_backend(
    device: torch.device, backend: str = "auto", dtype: torch.dtype | None = None
) -> _Backend:
    """The implementation used for ``dtype`` logits on ``device`` (see the module docstring for ``backend``)."""
    if backend not in BACKENDS:
        raise DomainLossError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return _TORCH_BACKEND
    ext = None
    if device.type == "cpu":
        ext = load_cpu_extension()
        impl: _Backend | None = _CpuNative(ext) if ext is not None else None
    elif device.type == "cuda":
        ext = load_cuda_extension()
        impl = _CudaNative(ext) if ext is not None else None
    else:
        impl = None
    if impl is not None and dtype is not None and dtype not in impl.dtypes:
        if backend == "native":
            raise DomainLossError(f"backend: the native {device.type} kernel does not handle {dtype} logits")
        return _TORCH_BACKEND
    if impl is not None:
        return impl
    if backend == "native":
        raise DomainLossError(
            f"backend: no native kernel for device {device} (disabled by MEGATRON_DOREMI_NO_NATIVE=1 or the "
            "build failed; see the warning logged by megatron_doremi.ops._build)"
        )
    return _TORCH_BACKEND


# ------------------------------------------------------------------------------------------------ autograd op


class _FusedDomainLossFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor,
        ref: torch.Tensor,
        scale: torch.Tensor,
        normalizer: torch.Tensor | None,
        ignore_index: int,
        impl: _Backend,
        inplace_backward: bool,
    ):
        batch, seq, _ = logits.shape
        num_domains = scale.numel()
        device = logits.device
        token_loss = torch.empty(batch, seq, dtype=torch.float32, device=device)
        lse = torch.empty(batch, seq, dtype=torch.float32, device=device)
        loss_sum, excess_sum, count = (
            torch.zeros(num_domains, dtype=torch.float64, device=device) for _ in range(3)
        )
        impl.forward(
            logits, labels, domain_ids, ref, ignore_index, token_loss, lse, loss_sum, excess_sum, count
        )
        norm = (scale * count).sum().clamp_min(1e-12) if normalizer is None else normalizer
        loss = ((scale * loss_sum).sum() / norm).float()
        row_coef = (scale[domain_ids] / norm).float().contiguous()  # dloss/dtoken_loss per batch row
        ctx.save_for_backward(logits, labels, lse, row_coef)
        ctx.ignore_index = ignore_index
        ctx.impl = impl
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(token_loss, loss_sum, excess_sum, count)
        return loss, token_loss, loss_sum, excess_sum, count

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, labels, lse, row_coef = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            coef = (row_coef * grad_loss.to(torch.float32)).contiguous()
            if ctx.inplace_backward:
                grad = logits
            else:
                grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            ctx.impl.backward(logits, labels, lse, coef, ctx.ignore_index, grad)
            if ctx.inplace_backward:
                torch.autograd.graph.increment_version(grad)
        return grad, None, None, None, None, None, None, None, None


def fused_domain_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    ref_token_loss: torch.Tensor | None = None,
    loss_scale_per_domain: torch.Tensor | None = None,
    ignore_index: int = -100,
    normalizer: float | torch.Tensor | None = None,
    *,
    inplace_backward: bool = False,
    backend: str = "auto",
    check_values: bool = True,
) -> DomainLossOutput:
    """Per-token cross-entropy of ``logits`` [B, T, V] vs aligned ``labels`` [B, T], grouped by row domain.

    Args:
        logits: [B, T, V] fp32/fp16/bf16, any strides; gradients flow into it only.
        labels: [B, T] int64/int32 target ids, ``ignore_index`` where a position is not scored.
        domain_ids: [B] integer domain of each row, in [0, num_domains).
        num_domains: D.
        ref_token_loss: optional [B, T] reference token loss for the excess statistics (not differentiated).
        loss_scale_per_domain: optional [D] multipliers of each domain's token loss in ``loss`` (default 1).
        ignore_index: label value that is skipped (loss 0, count 0, gradient 0).
        normalizer: divisor of the scaled loss sum (float or scalar tensor, treated as a constant); default
            the sum of scales over this call's scored tokens.
        inplace_backward: overwrite the logits' buffer with their gradient during backward (see module doc);
            ignored (out of place) when the logits' elements overlap (e.g. an expanded, stride-0 view) or the
            logits are, or are a view of, a leaf that requires grad.
        backend: "auto" | "native" | "torch" (see module doc).
        check_values: range-check labels and domain ids (exact on CPU; one asynchronous device-side assert on
            an accelerator, no host sync). Callers that validated their batches pass False.

    Returns:
        :class:`DomainLossOutput` (loss, token_loss, domain_loss_sum, domain_excess_sum, domain_token_count).
    """
    _check_shapes(logits, labels, domain_ids, num_domains, ref_token_loss, loss_scale_per_domain)
    num_domains = int(num_domains)
    device = logits.device
    labels64 = labels.to(device=device, dtype=torch.long).contiguous()
    domains64 = domain_ids.to(device=device, dtype=torch.long).contiguous()
    if check_values:
        _check_values(labels64, domains64, num_domains, logits.shape[-1], ignore_index)
    if ref_token_loss is None:
        ref = torch.empty(0, dtype=torch.float32, device=device)
    else:
        ref = ref_token_loss.detach().to(device=device, dtype=torch.float32).contiguous()
    if loss_scale_per_domain is None:
        scale = torch.ones(num_domains, dtype=torch.float64, device=device)
    else:
        scale = loss_scale_per_domain.detach().to(device=device, dtype=torch.float64)
    norm = None
    if normalizer is not None:
        norm = torch.as_tensor(normalizer, dtype=torch.float64, device=device).detach().reshape(())
    impl = resolve_backend(device, backend, logits.dtype)
    loss, token_loss, loss_sum, excess_sum, count = _FusedDomainLossFn.apply(
        logits,
        labels64,
        domains64,
        ref,
        scale,
        norm,
        int(ignore_index),
        impl,
        bool(inplace_backward) and _inplace_allowed(logits),
    )
    return DomainLossOutput(loss, token_loss, loss_sum, excess_sum, count)


domain_cross_entropy = fused_domain_cross_entropy
