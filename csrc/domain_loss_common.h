// Scalar semantics shared by the CPU (domain_loss.cpp) and CUDA (domain_loss_cuda.cu) kernels, so that both
// backends compute the per-token excess the same way by construction. The torch path of
// megatron_doremi/ops/fused_domain_loss.py (`_clip_excess`) writes the same expression.
#pragma once

#if defined(__CUDACC__)
#define MDL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MDL_HOST_DEVICE inline
#endif

// Clipped excess max(loss - ref, 0) that keeps NaN (fmaxf / std::fmax would turn a NaN difference into 0): the
// comparison is false for NaN, so a NaN loss or reference reaches the per-domain sums and the mixers' non-finite
// guards see it. +inf stays +inf; -inf (and any negative difference) becomes 0.
MDL_HOST_DEVICE float mdl_clip_excess(float loss, float ref) {
  const float d = loss - ref;
  return d < 0.0f ? 0.0f : d;
}
