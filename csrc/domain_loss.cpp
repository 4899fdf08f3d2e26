// Fused per-domain cross-entropy, CPU kernels (torch C++ extension; DESIGN section 5).
//
// forward:  for every row (b, t) of logits [B, T, V] (fp32/fp16/bf16, any strides) whose label is not
//           ignore_index: an fp32 online softmax over V that reads the logits once, in blocks of kChunk values
//           converted into a per-thread fp32 buffer (bounded extra memory: kChunk floats per thread), giving
//           lse = logsumexp(row) and loss = lse - row[label]. Ignored rows: loss 0, lse 0.
//           A NaN logit makes the row's lse and loss NaN; the clip keeps NaN (domain_loss_common.h, shared with
//           the CUDA kernels), so non-finite tokens reach the per-domain sums as in torch.
//           Per-domain sums (fp64) of loss, of max(loss - ref, 0) (ref = 0 when no reference is given) and of
//           the non-ignored token count are then reduced serially in a fixed order (rows b = 0..B-1, tokens
//           t = 0..T-1), so they are bit-identical run to run and independent of the thread count.
// backward: grad[b, t, :] = coef[b] * (softmax(row) - onehot(label)), written into `grad` (a new buffer or the
//           logits' own storage, with its own strides); ignored rows get 0. One read + one write per value.
// Rows are split over threads with at::parallel_for (needs -fopenmp, as torch's CPU build uses OpenMP).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "domain_loss_common.h"

namespace {

constexpr int64_t kChunk = 2048;  // fp32 values per block: 8 KiB, stays in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MDL_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define MDL_CLONES
#endif

// exp(x) for fp32 (Cephes expf: range reduction + degree-6 polynomial, ~1 ulp), written with plain float/int
// operations so that the loops below vectorise; exactly 0 below ln(FLT_MIN), NaN in -> NaN out.
static inline __attribute__((always_inline)) float fast_exp(float x) {
  const float lo = -87.33654f;
  const float hi = 88.3762626647949f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float t = xc * 1.44269504088896341f + magic;
  int32_t tbits;
  std::memcpy(&tbits, &t, sizeof(tbits));
  const int32_t n = tbits - 0x4B400000;
  const float fn = t - magic;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ebits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &ebits, sizeof(scale));
  const float y = p * scale;
  return x < lo ? 0.0f : y;
}

// Max of a block, NaN if the block holds a NaN (a plain max reduction would drop it; torch propagates it).
MDL_CLONES float chunk_max(const float* buf, int64_t n) {
  float m = kNegInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = buf[i] > m ? buf[i] : m;
    nan |= buf[i] != buf[i];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

MDL_CLONES float chunk_sum_exp(const float* buf, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_exp(buf[i] - shift);
  return s;
}

// out[i] = coef * exp(buf[i] - lse), in place.
MDL_CLONES void chunk_scaled_softmax(float* buf, int64_t n, float lse, float coef) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = coef * fast_exp(buf[i] - lse);
}

// bf16 <-> fp32 on raw bits (vectorisable): widening is a shift; narrowing rounds to nearest even like
// c10::BFloat16(float), NaN -> quiet NaN.
MDL_CLONES void bf16_to_float(const uint16_t* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

MDL_CLONES void float_to_bf16(const float* src, int64_t n, uint16_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = src[i] != src[i] ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
  }
}

template <typename T>
inline void load_chunk(const T* src, int64_t stride, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (stride == 1) return bf16_to_float(reinterpret_cast<const uint16_t*>(src), n, dst);
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

template <typename T>
inline void store_chunk(const float* src, int64_t n, T* dst, int64_t stride) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (stride == 1) return float_to_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
  }
}

// logsumexp of one row, reading it once (block-wise online softmax in fp32).
template <typename T>
float row_logsumexp(const T* row, int64_t vocab, int64_t stride, float* buf) {
  float m = kNegInf;
  float s = 0.0f;
  for (int64_t v0 = 0; v0 < vocab; v0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - v0);
    load_chunk(row + v0 * stride, stride, n, buf);
    const float bm = chunk_max(buf, n);
    if (bm != bm) return bm;  // a NaN logit: the row's lse (and loss) is NaN, as in torch
    if (m == kPosInf) continue;  // lse is +inf (torch's logsumexp) unless a NaN follows
    if (bm == kPosInf) {
      m = bm;
      continue;
    }
    if (bm > m) {
      s = (m == kNegInf) ? 0.0f : s * fast_exp(m - bm);
      m = bm;
    }
    if (m != kNegInf) s += chunk_sum_exp(buf, n, m);
  }
  return m == kPosInf ? m : m + std::log(s);
}

struct Geometry {
  int64_t batch, seq, vocab, sb, st, sv;
};

Geometry geometry_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

void check_common(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse) {
  TORCH_CHECK(logits.device().is_cpu(), "domain_loss_cpu: logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 3, "domain_loss_cpu: logits must be [B, T, V]");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.dim() == 2 &&
                  labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "domain_loss_cpu: labels must be contiguous int64 [B, T]");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == labels.numel(),
              "domain_loss_cpu: lse must be contiguous fp32 [B, T]");
}

template <typename T>
void forward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index, float* token_loss,
                  float* lse) {
  const Geometry g = geometry_of(logits);
  const T* base = logits.data_ptr<T>();
  const int64_t rows = g.batch * g.seq;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(g.vocab, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      if (label == ignore_index) {
        token_loss[r] = 0.0f;
        lse[r] = 0.0f;
        continue;
      }
      const int64_t b = r / g.seq;
      const int64_t t = r - b * g.seq;
      const T* row = base + b * g.sb + t * g.st;
      const float l = row_logsumexp(row, g.vocab, g.sv, buf);
      lse[r] = l;
      token_loss[r] = l - static_cast<float>(row[label * g.sv]);
    }
  });
}

void forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& domain_ids,
             const at::Tensor& ref, int64_t ignore_index, at::Tensor token_loss, at::Tensor lse,
             at::Tensor domain_loss_sum, at::Tensor domain_excess_sum, at::Tensor domain_token_count) {
  check_common(logits, labels, lse);
  const int64_t batch = logits.size(0), seq = logits.size(1), vocab = logits.size(2);
  const int64_t num_domains = domain_loss_sum.numel();
  TORCH_CHECK(token_loss.scalar_type() == at::kFloat && token_loss.is_contiguous() &&
                  token_loss.numel() == batch * seq,
              "domain_loss_cpu: token_loss must be contiguous fp32 [B, T]");
  TORCH_CHECK(domain_ids.scalar_type() == at::kLong && domain_ids.is_contiguous() && domain_ids.numel() == batch,
              "domain_loss_cpu: domain_ids must be contiguous int64 [B]");
  const bool has_ref = ref.numel() > 0;
  TORCH_CHECK(!has_ref || (ref.scalar_type() == at::kFloat && ref.is_contiguous() && ref.numel() == batch * seq),
              "domain_loss_cpu: ref must be contiguous fp32 [B, T] or empty");
  for (const at::Tensor* t : {&domain_loss_sum, &domain_excess_sum, &domain_token_count}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == num_domains,
                "domain_loss_cpu: per-domain outputs must be contiguous fp64 [D]");
  }
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* dom = domain_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < batch * seq; ++r) {
    TORCH_CHECK_INDEX(lab[r] == ignore_index || (lab[r] >= 0 && lab[r] < vocab), "domain_loss_cpu: label ",
                      lab[r], " at flat position ", r, " outside [0, ", vocab, ")");
  }
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_INDEX(dom[b] >= 0 && dom[b] < num_domains, "domain_loss_cpu: domain id ", dom[b], " at row ", b,
                      " outside [0, ", num_domains, ")");
  }
  float* tl = token_loss.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "domain_loss_cpu_forward", [&] {
    forward_rows<scalar_t>(logits, lab, ignore_index, tl, lse.data_ptr<float>());
  });

  // Fixed-order fp64 reduction: token -> row -> domain.
  double* dl = domain_loss_sum.data_ptr<double>();
  double* de = domain_excess_sum.data_ptr<double>();
  double* dc = domain_token_count.data_ptr<double>();
  std::fill(dl, dl + num_domains, 0.0);
  std::fill(de, de + num_domains, 0.0);
  std::fill(dc, dc + num_domains, 0.0);
  const float* rf = has_ref ? ref.data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) {
    double row_loss = 0.0, row_excess = 0.0;
    int64_t row_count = 0;
    for (int64_t t = 0; t < seq; ++t) {
      const int64_t r = b * seq + t;
      if (lab[r] == ignore_index) continue;
      const float l = tl[r];
      const float e = has_ref ? mdl_clip_excess(l, rf[r]) : l;
      row_loss += static_cast<double>(l);
      row_excess += static_cast<double>(e);
      ++row_count;
    }
    dl[dom[b]] += row_loss;
    de[dom[b]] += row_excess;
    dc[dom[b]] += static_cast<double>(row_count);
  }
}

template <typename T>
void backward_rows(const at::Tensor& logits, const int64_t* labels, const float* lse, const float* row_coef,
                   int64_t ignore_index, at::Tensor& grad) {
  const Geometry g = geometry_of(logits);
  const Geometry o = geometry_of(grad);
  const T* base = logits.data_ptr<T>();
  T* out = grad.data_ptr<T>();
  const int64_t rows = g.batch * g.seq;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(g.vocab, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.seq;
      const int64_t t = r - b * g.seq;
      const T* row = base + b * g.sb + t * g.st;
      T* orow = out + b * o.sb + t * o.st;
      const int64_t label = labels[r];
      const float coef = label == ignore_index ? 0.0f : row_coef[b];
      if (coef == 0.0f) {
        std::fill(buf, buf + std::min(kChunk, g.vocab), 0.0f);
        for (int64_t v0 = 0; v0 < g.vocab; v0 += kChunk) {
          store_chunk(buf, std::min(kChunk, g.vocab - v0), orow + v0 * o.sv, o.sv);
        }
        continue;
      }
      const float l = lse[r];
      for (int64_t v0 = 0; v0 < g.vocab; v0 += kChunk) {
        const int64_t n = std::min(kChunk, g.vocab - v0);
        load_chunk(row + v0 * g.sv, g.sv, n, buf);
        chunk_scaled_softmax(buf, n, l, coef);
        if (label >= v0 && label < v0 + n) buf[label - v0] -= coef;
        store_chunk(buf, n, orow + v0 * o.sv, o.sv);
      }
    }
  });
}

void backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& row_coef,
              int64_t ignore_index, at::Tensor grad) {
  check_common(logits, labels, lse);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == logits.scalar_type() && grad.sizes() == logits.sizes(),
              "domain_loss_cpu: grad must be a CPU tensor with the logits' shape and dtype");
  TORCH_CHECK(row_coef.scalar_type() == at::kFloat && row_coef.is_contiguous() && row_coef.numel() == logits.size(0),
              "domain_loss_cpu: row_coef must be contiguous fp32 [B]");
  const int64_t* lab = labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "domain_loss_cpu_backward", [&] {
    backward_rows<scalar_t>(logits, lab, lse.data_ptr<float>(), row_coef.data_ptr<float>(), ignore_index, grad);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_doremi fused per-domain cross-entropy, CPU kernels";
  m.def("forward", &forward, "per-token loss / lse and fixed-order per-domain fp64 sums (fills the outputs)",
        py::arg("logits"), py::arg("labels"), py::arg("domain_ids"), py::arg("ref"), py::arg("ignore_index"),
        py::arg("token_loss"), py::arg("lse"), py::arg("domain_loss_sum"), py::arg("domain_excess_sum"),
        py::arg("domain_token_count"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "grad = row_coef[b] * (softmax - onehot(label)), written into grad",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("row_coef"), py::arg("ignore_index"),
        py::arg("grad"), py::call_guard<py::gil_scoped_release>());
}
