// Fused per-domain cross-entropy, CUDA kernels (DESIGN section 5). This file needs only the CUDA headers (no
// torch): csrc/domain_loss_cuda_binding.cpp holds the torch glue and calls the launchers declared at the end.
//
// Layout: logits [B, T, V] with element strides (sb, st, sv), dtype fp32 / fp16 / bf16. With sv == 1 the row is
// read with 16-byte vector loads (a scalar head up to the first 16-byte boundary, a vector body, a scalar tail:
// any V, any row alignment); sv != 1 is supported by a scalar strided loop (correct, slower).
//
// forward (per row r = b*T + t, one block per row):
//   fp32 online softmax over V reading each logit once -> lse[r], token_loss[r] = lse - x[label]
//   (ignored rows: 0, 0). Then, without float atomics:
//   row kernel   : one block per b, fixed-tree fp64 sums over t of loss, max(loss - ref, 0) (ref = 0 if absent)
//                  and the non-ignored count -> row buffers [B];
//   domain kernel: one thread per domain, adds the row buffers for b = 0..B-1 in order -> [D] fp64.
//   All reductions have a fixed order, so results are bit-identical run to run.
// backward (per row): grad = coef[b] * (exp(x - lse) - onehot(label)); ignored rows 0. `grad` may alias the
//   logits exactly (in place: each thread reads its values into registers before writing them; the host never
//   passes an overlapping-but-different or self-overlapping buffer) or be a separate buffer; 16-byte vector
//   loads (4 in flight per thread) and stores when both have sv == 1 and the same 16-byte misalignment.
// Non-finite inputs: a NaN logit makes its row's lse and loss NaN (also when it arrives while the running max is
//   -inf); +inf logits give lse = +inf (torch's logsumexp), so a loss of +inf, or NaN when the label is +inf; the excess clip (domain_loss_common.h) keeps NaN. So a non-finite
//   token reaches the per-domain sums, as in torch.
// No B*T*V temporaries: extra memory is 2 floats per token plus 3 values per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "domain_loss_cuda.h"
#include "domain_loss_common.h"

namespace {

constexpr float kNegInf = -__builtin_huge_valf();

template <typename T>
struct Io;

template <>
struct Io<float> {
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
};
template <>
struct Io<__half> {
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
  __device__ __forceinline__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// 16 bytes of T as fp32 values and back.
template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);
  __device__ __forceinline__ static void unpack(const uint4& raw, float* out) {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = Io<T>::load(e + k);
  }
  __device__ __forceinline__ static uint4 pack(const float* in) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < kN; ++k) Io<T>::store(e + k, in[k]);
    return raw;
  }
};

// Online-softmax state: running max m and sum s of exp(x - m).
struct MaxSum {
  float m;
  float s;
};

// NaN propagates as in torch's logsumexp: a NaN input makes the running max NaN (every later comparison is
// false, so it stays NaN) and the result NaN, whatever the running max was when it arrived (-inf included).
__device__ __forceinline__ void update(MaxSum& a, float x) {
  if (x != x) {
    a.m = x;
    a.s = x;
  } else if (x > a.m) {
    a.s = (a.m == kNegInf ? 0.0f : a.s * __expf(a.m - x)) + 1.0f;
    a.m = x;
  } else if (a.m != kNegInf) {
    a.s += __expf(x - a.m);  // a NaN running max/sum stays NaN
  }
}

// fmaxf drops NaN operands; this max keeps them (the block max of a row holding a NaN is NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

template <int N>
__device__ __forceinline__ void update_n(MaxSum& a, const float* x) {
  float vm = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vm = nan_max(vm, x[k]);
  if (vm != vm) {
    a.m = vm;
    a.s = vm;
    return;
  }
  if (vm > a.m) {
    a.s = a.m == kNegInf ? 0.0f : a.s * __expf(a.m - vm);
    a.m = vm;
  }
  if (a.m != kNegInf) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < N; ++k) s += __expf(x[k] - a.m);
    a.s += s;
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = nan_max(a.m, b.m);
  if (m != m) return {m, m};
  if (m == kNegInf) return {kNegInf, 0.0f};
  const float sa = a.m == kNegInf ? 0.0f : a.s * __expf(a.m - m);
  const float sb = b.m == kNegInf ? 0.0f : b.s * __expf(b.m - m);
  return {m, sa + sb};
}

// Fixed-tree block reduction (warp shuffles, then warp 0 over the per-warp results); result valid in thread 0.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum warp_part[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
    v = merge(v, o);
  }
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    v = lane < warps ? warp_part[lane] : MaxSum{kNegInf, 0.0f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
      v = merge(v, o);
    }
  }
  return v;
}

template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t vocab) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) & 15u;
  const int64_t head = mis == 0 ? 0 : static_cast<int64_t>((16u - mis) / sizeof(T));
  return head < vocab ? head : vocab;
}

template <typename T>
__global__ void __launch_bounds__(1024) forward_kernel(const T* __restrict__ logits, int64_t seq, int64_t vocab,
                                                        int64_t sb, int64_t st, int64_t sv,
                                                        const int64_t* __restrict__ labels, int64_t ignore_index,
                                                        float* __restrict__ token_loss, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const int64_t label = labels[r];
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      token_loss[r] = 0.0f;
      lse[r] = 0.0f;
    }
    return;
  }
  const int64_t b = r / seq;
  const int64_t t = r - b * seq;
  const T* row = logits + b * sb + t * st;
  MaxSum acc{kNegInf, 0.0f};
  if (sv == 1) {
    constexpr int kN = Vec<T>::kN;
    const int64_t head = head_elems(row, vocab);
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) update(acc, Io<T>::load(row + i));
    const int64_t nvec = (vocab - head) / kN;
    const uint4* body = reinterpret_cast<const uint4*>(row + head);
    int64_t j = threadIdx.x;
    // two 16-byte loads in flight per thread per iteration
    for (; j + blockDim.x < nvec; j += 2 * static_cast<int64_t>(blockDim.x)) {
      const uint4 r0 = __ldg(body + j);
      const uint4 r1 = __ldg(body + j + blockDim.x);
      float x[kN];
      Vec<T>::unpack(r0, x);
      update_n<kN>(acc, x);
      Vec<T>::unpack(r1, x);
      update_n<kN>(acc, x);
    }
    if (j < nvec) {
      float x[kN];
      Vec<T>::unpack(__ldg(body + j), x);
      update_n<kN>(acc, x);
    }
    for (int64_t i = head + nvec * kN + threadIdx.x; i < vocab; i += blockDim.x) update(acc, Io<T>::load(row + i));
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) update(acc, Io<T>::load(row + i * sv));
  }
  acc = block_merge(acc);
  if (threadIdx.x == 0) {
    // +inf logits (and no NaN): lse = +inf as in torch's logsumexp (the running sum is then meaningless)
    const float l = acc.m == -kNegInf ? acc.m : acc.m + logf(acc.s);
    const bool ok = label >= 0 && label < vocab;  // the host validates; never read out of bounds regardless
    lse[r] = l;
    token_loss[r] = ok ? l - Io<T>::load(row + label * sv) : __int_as_float(0x7fc00000);
  }
}

// One block per batch row b: fixed-tree fp64 sums over t.
__global__ void __launch_bounds__(256) row_sum_kernel(const float* __restrict__ token_loss,
                                                      const int64_t* __restrict__ labels,
                                                      const float* __restrict__ ref, int64_t seq,
                                                      int64_t ignore_index, double* __restrict__ row_loss,
                                                      double* __restrict__ row_excess,
                                                      double* __restrict__ row_count) {
  __shared__ double s_loss[256];
  __shared__ double s_excess[256];
  __shared__ double s_count[256];
  const int64_t b = blockIdx.x;
  double l_acc = 0.0, e_acc = 0.0, c_acc = 0.0;
  for (int64_t t = threadIdx.x; t < seq; t += blockDim.x) {
    const int64_t r = b * seq + t;
    if (labels[r] == ignore_index) continue;
    const float l = token_loss[r];
    const float e = ref == nullptr ? l : mdl_clip_excess(l, ref[r]);
    l_acc += static_cast<double>(l);
    e_acc += static_cast<double>(e);
    c_acc += 1.0;
  }
  s_loss[threadIdx.x] = l_acc;
  s_excess[threadIdx.x] = e_acc;
  s_count[threadIdx.x] = c_acc;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      s_loss[threadIdx.x] += s_loss[threadIdx.x + half];
      s_excess[threadIdx.x] += s_excess[threadIdx.x + half];
      s_count[threadIdx.x] += s_count[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_loss[b] = s_loss[0];
    row_excess[b] = s_excess[0];
    row_count[b] = s_count[0];
  }
}

// One thread per domain: rows added in order b = 0..B-1.
__global__ void domain_sum_kernel(const double* __restrict__ row_loss, const double* __restrict__ row_excess,
                                  const double* __restrict__ row_count, const int64_t* __restrict__ domain_ids,
                                  int64_t batch, int64_t num_domains, double* __restrict__ dom_loss,
                                  double* __restrict__ dom_excess, double* __restrict__ dom_count) {
  for (int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; d < num_domains;
       d += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double l = 0.0, e = 0.0, c = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      if (domain_ids[b] != d) continue;
      l += row_loss[b];
      e += row_excess[b];
      c += row_count[b];
    }
    dom_loss[d] = l;
    dom_excess[d] = e;
    dom_count[d] = c;
  }
}

template <typename T>
__global__ void __launch_bounds__(1024) backward_kernel(const T* logits, int64_t seq, int64_t vocab, int64_t sb,
                                                         int64_t st, int64_t sv, T* grad, int64_t gb, int64_t gt,
                                                         int64_t gv, const int64_t* __restrict__ labels,
                                                         int64_t ignore_index, const float* __restrict__ lse,
                                                         const float* __restrict__ row_coef) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / seq;
  const int64_t t = r - b * seq;
  const T* row = logits + b * sb + t * st;
  T* out = grad + b * gb + t * gt;
  const int64_t label = labels[r];
  const float coef = label == ignore_index ? 0.0f : row_coef[b];
  const float l = lse[r];
  constexpr int kN = Vec<T>::kN;
  const bool vec = sv == 1 && gv == 1 &&
                   (reinterpret_cast<uintptr_t>(row) & 15u) == (reinterpret_cast<uintptr_t>(out) & 15u);
  if (coef == 0.0f) {
    const float zero[kN] = {};
    if (vec) {
      const int64_t head = head_elems(out, vocab);
      const int64_t nvec = (vocab - head) / kN;
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) Io<T>::store(out + i, 0.0f);
      uint4* body = reinterpret_cast<uint4*>(out + head);
      const uint4 z = Vec<T>::pack(zero);
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) body[j] = z;
      for (int64_t i = head + nvec * kN + threadIdx.x; i < vocab; i += blockDim.x) Io<T>::store(out + i, 0.0f);
    } else {
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) Io<T>::store(out + i * gv, 0.0f);
    }
    return;
  }
  if (vec) {
    const int64_t head = head_elems(row, vocab);
    const int64_t nvec = (vocab - head) / kN;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
      const float g = coef * __expf(Io<T>::load(row + i) - l) - (i == label ? coef : 0.0f);
      Io<T>::store(out + i, g);
    }
    const uint4* in_body = reinterpret_cast<const uint4*>(row + head);
    uint4* out_body = reinterpret_cast<uint4*>(out + head);
    // kUnroll 16-byte loads into registers before the stores: one LDG.128 each (a reference into global memory
    // would be read element by element) and several loads in flight per thread. Safe in place: a thread reads
    // exactly the addresses it then writes, and all its reads come first.
    constexpr int kUnroll = 4;
    const int64_t step = blockDim.x;
    int64_t j = threadIdx.x;
    for (; j + (kUnroll - 1) * step < nvec; j += kUnroll * step) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = in_body[j + u * step];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float x[kN];
        Vec<T>::unpack(raw[u], x);
        const int64_t first = head + (j + u * step) * kN;
#pragma unroll
        for (int k = 0; k < kN; ++k) x[k] = coef * __expf(x[k] - l) - (first + k == label ? coef : 0.0f);
        out_body[j + u * step] = Vec<T>::pack(x);
      }
    }
    for (; j < nvec; j += step) {
      const uint4 raw = in_body[j];
      float x[kN];
      Vec<T>::unpack(raw, x);
      const int64_t first = head + j * kN;
#pragma unroll
      for (int k = 0; k < kN; ++k) x[k] = coef * __expf(x[k] - l) - (first + k == label ? coef : 0.0f);
      out_body[j] = Vec<T>::pack(x);
    }
    for (int64_t i = head + nvec * kN + threadIdx.x; i < vocab; i += blockDim.x) {
      const float g = coef * __expf(Io<T>::load(row + i) - l) - (i == label ? coef : 0.0f);
      Io<T>::store(out + i, g);
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float g = coef * __expf(Io<T>::load(row + i * sv) - l) - (i == label ? coef : 0.0f);
      Io<T>::store(out + i * gv, g);
    }
  }
}

// Threads per row block: enough for ~16 vectors per thread, a power of two in [64, 512].
int threads_for(int64_t vocab, int64_t elem_size) {
  const int64_t per_vec = 16 / elem_size;
  const int64_t want = vocab / (per_vec * 16);
  int threads = 64;
  while (threads < 512 && threads < want) threads <<= 1;
  return threads;
}

template <typename T>
cudaError_t launch_forward(const MdlForwardArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.seq;
  if (rows > 0) {
    const int threads = threads_for(a.vocab, sizeof(T));
    forward_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(a.logits), a.seq, a.vocab, a.sb, a.st, a.sv, a.labels, a.ignore_index, a.token_loss,
        a.lse);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.batch > 0) {
    row_sum_kernel<<<static_cast<unsigned>(a.batch), 256, 0, stream>>>(a.token_loss, a.labels, a.ref, a.seq,
                                                                       a.ignore_index, a.row_loss, a.row_excess,
                                                                       a.row_count);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.num_domains > 0) {
    const int threads = 128;
    const unsigned blocks = static_cast<unsigned>((a.num_domains + threads - 1) / threads);
    domain_sum_kernel<<<blocks, threads, 0, stream>>>(a.row_loss, a.row_excess, a.row_count, a.domain_ids, a.batch,
                                                      a.num_domains, a.dom_loss, a.dom_excess, a.dom_count);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const MdlBackwardArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.seq;
  if (rows == 0) return cudaSuccess;
  const int threads = threads_for(a.vocab, sizeof(T));
  backward_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(a.logits), a.seq, a.vocab, a.sb, a.st, a.sv, static_cast<T*>(a.grad), a.gb, a.gt, a.gv,
      a.labels, a.ignore_index, a.lse, a.row_coef);
  return cudaGetLastError();
}

}  // namespace

int mdl_forward(const MdlForwardArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (args.batch * args.seq > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  switch (args.dtype) {
    case kMdlFloat32: return static_cast<int>(launch_forward<float>(args, s));
    case kMdlFloat16: return static_cast<int>(launch_forward<__half>(args, s));
    case kMdlBFloat16: return static_cast<int>(launch_forward<__nv_bfloat16>(args, s));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int mdl_backward(const MdlBackwardArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (args.batch * args.seq > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  switch (args.dtype) {
    case kMdlFloat32: return static_cast<int>(launch_backward<float>(args, s));
    case kMdlFloat16: return static_cast<int>(launch_backward<__half>(args, s));
    case kMdlBFloat16: return static_cast<int>(launch_backward<__nv_bfloat16>(args, s));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* mdl_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
