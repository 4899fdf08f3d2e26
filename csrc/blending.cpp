// Blending index builders (exact Megatron greedy, periodic default mode).
//
// Functions registered on megatron_doremi._helpers (all fill caller-allocated numpy arrays, release the GIL
// in their loops and are mirrored bit for bit by the numpy fallbacks in megatron_doremi/data/blending.py):
//   blend_exact(weights f64[D], start, counts i64[D] (in/out), domain_out u8|u16|u32[n], sample_out i64[n])
//       Megatron-LM's build_blending_indices greedy for samples start..start+n-1, resuming from `counts`.
//   blend_exact_megatron(weights f64[D], domain_out u8|u16[n], sample_out i64[n])
//       a plain re-implementation of Megatron's loop (int64 counters); a benchmark baseline.
//   blend_period_table(counts i64[D], period, table_out u8|u16|i32[limit], rank_out i32[limit], lag i64[D]|None)
//       The first `limit` slots of the earliest-deadline-first period schedule (see blending.py); with `lag`,
//       the schedule of a segment that starts owing lag[d] / period samples of domain d.
//   blend_lookup(table, rank, counts, offsets, period, start, indices i64[n], domain_out i64[n], index_out i64[n])
//   blend_lookup_range(table, rank, counts, offsets, period, start, first, domain_out i64[n], index_out i64[n])
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// The exact greedy must round exactly like Megatron's (a product, then a subtraction): no fused multiply-add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* mutable_data(py::array& a, const char* what, py::ssize_t n) {
  if (!py::isinstance<py::array_t<T>>(a) || a.ndim() != 1 || a.shape(0) != n ||
      !(a.flags() & py::array::c_style) || !a.writeable()) {
    throw std::invalid_argument(std::string(what) + ": expected a writeable contiguous 1-D array of length " +
                                std::to_string(n) + " and the right dtype");
  }
  return static_cast<T*>(a.mutable_data());
}

template <typename T>
const T* const_data(const py::array& a, const char* what) {
  if (!py::isinstance<py::array_t<T>>(a) || a.ndim() != 1 || !(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(what) + ": expected a contiguous 1-D array of the right dtype");
  }
  return static_cast<const T*>(a.data());
}

// ---------------------------------------------------------------------------------------------------------
// Exact mode: Megatron's greedy. For sample i pick the first d maximising w[d] * max(i, 1) - c[d] (float64,
// a product then a subtraction), emit (d, c[d]), c[d] += 1. Counters are kept as doubles (exact below 2^53),
// which gives the same values as Megatron's int64 -> double conversion.
template <typename DT>
void exact_loop(const double* w, int64_t D, int64_t start, int64_t n, int64_t* counts, DT* dom, int64_t* smp) {
  std::vector<double> c(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) c[d] = static_cast<double>(counts[d]);
  double* cp = c.data();
  std::vector<double> e(static_cast<size_t>(D));
  double* ep = e.data();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = start + k;
    const double x = std::max(static_cast<double>(i), 1.0);
    // Errors, their maximum (max is exact, so four interleaved partial maxima are fine), then the first d
    // attaining it: the same d as Megatron's strict ">" scan (no NaNs; -0.0 == 0.0 either way).
    double m0 = -INFINITY, m1 = -INFINITY, m2 = -INFINITY, m3 = -INFINITY;
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      const double e0 = w[d] * x - cp[d], e1 = w[d + 1] * x - cp[d + 1];
      const double e2 = w[d + 2] * x - cp[d + 2], e3 = w[d + 3] * x - cp[d + 3];
      ep[d] = e0;
      ep[d + 1] = e1;
      ep[d + 2] = e2;
      ep[d + 3] = e3;
      m0 = e0 > m0 ? e0 : m0;
      m1 = e1 > m1 ? e1 : m1;
      m2 = e2 > m2 ? e2 : m2;
      m3 = e3 > m3 ? e3 : m3;
    }
    for (; d < D; ++d) {
      const double e0 = w[d] * x - cp[d];
      ep[d] = e0;
      m0 = e0 > m0 ? e0 : m0;
    }
    m0 = m1 > m0 ? m1 : m0;
    m2 = m3 > m2 ? m3 : m2;
    m0 = m2 > m0 ? m2 : m0;
    int64_t best = 0;
    while (ep[best] != m0) ++best;
    dom[k] = static_cast<DT>(best);
    smp[k] = static_cast<int64_t>(cp[best]);
    cp[best] += 1.0;
  }
  for (int64_t d = 0; d < D; ++d) counts[d] = static_cast<int64_t>(c[d]);
}

void blend_exact(py::array weights, int64_t start, py::array counts, py::array domain_out, py::array sample_out) {
  const double* w = const_data<double>(weights, "weights");
  const int64_t D = weights.shape(0);
  if (D < 1) throw std::invalid_argument("weights: need at least one domain");
  if (start < 0) throw std::invalid_argument("start must be >= 0");
  int64_t* c = mutable_data<int64_t>(counts, "counts", D);
  const int64_t n = sample_out.ndim() == 1 ? sample_out.shape(0) : -1;
  int64_t* smp = mutable_data<int64_t>(sample_out, "sample_out", n);
  if (py::isinstance<py::array_t<uint8_t>>(domain_out)) {
    if (D > 256) throw std::invalid_argument("domain_out: uint8 holds at most 256 domains");
    uint8_t* dom = mutable_data<uint8_t>(domain_out, "domain_out", n);
    py::gil_scoped_release nogil;
    exact_loop<uint8_t>(w, D, start, n, c, dom, smp);
  } else if (py::isinstance<py::array_t<uint16_t>>(domain_out)) {
    if (D > 65536) throw std::invalid_argument("domain_out: uint16 holds at most 65536 domains");
    uint16_t* dom = mutable_data<uint16_t>(domain_out, "domain_out", n);
    py::gil_scoped_release nogil;
    exact_loop<uint16_t>(w, D, start, n, c, dom, smp);
  } else {
    uint32_t* dom = mutable_data<uint32_t>(domain_out, "domain_out (uint8, uint16 or uint32)", n);
    py::gil_scoped_release nogil;
    exact_loop<uint32_t>(w, D, start, n, c, dom, smp);
  }
}

// A plain re-implementation of the loop in Megatron-LM's build_blending_indices (benchmark baseline).
template <typename DT>
void megatron_loop(const double* weights_ptr, int64_t num_datasets, int64_t size, DT* dataset_index_ptr,
                   int64_t* dataset_sample_index_ptr) {
  std::vector<int64_t> current_samples(static_cast<size_t>(num_datasets), 0);
  for (int64_t sample_idx = 0; sample_idx < size; ++sample_idx) {
    auto sample_idx_double = std::max(static_cast<double>(sample_idx), 1.0);
    int64_t max_error_index = 0;
    double max_error = weights_ptr[0] * sample_idx_double - static_cast<double>(current_samples[0]);
    for (int64_t dataset_idx = 1; dataset_idx < num_datasets; ++dataset_idx) {
      double error = weights_ptr[dataset_idx] * sample_idx_double - static_cast<double>(current_samples[dataset_idx]);
      if (error > max_error) {
        max_error = error;
        max_error_index = dataset_idx;
      }
    }
    dataset_index_ptr[sample_idx] = static_cast<DT>(max_error_index);
    dataset_sample_index_ptr[sample_idx] = current_samples[max_error_index];
    current_samples[max_error_index] += 1;
  }
}

void blend_exact_megatron(py::array weights, py::array domain_out, py::array sample_out) {
  const double* w = const_data<double>(weights, "weights");
  const int64_t D = weights.shape(0);
  if (D < 1) throw std::invalid_argument("weights: need at least one domain");
  const int64_t n = sample_out.ndim() == 1 ? sample_out.shape(0) : -1;
  int64_t* smp = mutable_data<int64_t>(sample_out, "sample_out", n);
  if (py::isinstance<py::array_t<uint8_t>>(domain_out)) {
    uint8_t* dom = mutable_data<uint8_t>(domain_out, "domain_out", n);
    py::gil_scoped_release nogil;
    megatron_loop<uint8_t>(w, D, n, dom, smp);
  } else {
    uint16_t* dom = mutable_data<uint16_t>(domain_out, "domain_out (uint8 or uint16)", n);
    py::gil_scoped_release nogil;
    megatron_loop<uint16_t>(w, D, n, dom, smp);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Period table: earliest-deadline-first over unit jobs. Without a lag, domain d (count m = m_d > 0) has jobs
// k = 1..m with release slot floor((k-1) P / m) and deadline slot ceil(k P / m) - 1. Slot i takes the released
// job with the smallest (deadline, d). The windows satisfy Hall's condition, so EDF fills every slot on time and
// floor(m t / P) <= c_d(t) <= ceil(m t / P) for every prefix t (proof in blending.py). A segment after the first
// shifts each domain's windows by its lag (what it is owed when the segment starts).
// Binary min-heap of packed keys (slot << 32 | domain): one integer compare orders by (slot, domain).
class KeyHeap {
 public:
  explicit KeyHeap(size_t cap) { h_.reserve(cap); }
  bool empty() const { return h_.empty(); }
  uint64_t top() const { return h_[0]; }
  void push(uint64_t key) {
    size_t i = h_.size();
    h_.push_back(key);
    while (i > 0) {
      const size_t p = (i - 1) / 2;
      if (h_[p] <= key) break;
      h_[i] = h_[p];
      i = p;
    }
    h_[i] = key;
  }
  void pop() {
    const uint64_t last = h_.back();
    h_.pop_back();
    if (!h_.empty()) sift_down(last);
  }

 private:
  void sift_down(uint64_t key) {
    const size_t n = h_.size();
    size_t i = 0;
    for (;;) {
      size_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && h_[c + 1] < h_[c]) ++c;
      if (key <= h_[c]) break;
      h_[i] = h_[c];
      i = c;
    }
    h_[i] = key;
  }
  std::vector<uint64_t> h_;
};

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Domain d is owed lag[d] / P samples when the period starts (0 for a plain period table, see blending.py): its
// job k (0-based) is released at max(0, floor((k P - lag) / m)) and due at
// min(P - 1, max(release, ceil(((k + 1) P - lag) / m) - 1)); a slot with no released job takes the earliest
// released one early. Returns false if a deadline was missed, which cannot happen without a lag.
template <typename TT>
bool period_loop(const int64_t* m, const int64_t* lag, int64_t D, int64_t P, int64_t limit, TT* table,
                 int32_t* rank) {
  constexpr uint64_t kLow = 0xffffffffULL;
  auto release = [&](int64_t d, int64_t k) { return std::max<int64_t>(0, floor_div(k * P - lag[d], m[d])); };
  auto deadline = [&](int64_t d, int64_t k) {
    const int64_t due = -floor_div(lag[d] - (k + 1) * P, m[d]) - 1;  // ceil(((k + 1) P - lag) / m) - 1
    return std::min<int64_t>(P - 1, std::max(release(d, k), due));
  };
  auto key = [](int64_t when, int64_t d) { return (static_cast<uint64_t>(when) << 32) | static_cast<uint64_t>(d); };
  KeyHeap ready(static_cast<size_t>(D));    // (deadline, d) of the next job of each released domain
  KeyHeap pending(static_cast<size_t>(D));  // (release, d) of the next job of each unreleased domain
  std::vector<int64_t> c(D, 0);
  bool on_time = true;
  for (int64_t d = 0; d < D; ++d) {
    if (m[d] > 0) pending.push(key(release(d, 0), d));
  }
  for (int64_t i = 0; i < limit; ++i) {
    while (!pending.empty() && static_cast<int64_t>(pending.top() >> 32) <= i) {
      const int64_t d = static_cast<int64_t>(pending.top() & kLow);
      pending.pop();
      ready.push(key(deadline(d, c[d]), d));
    }
    if (ready.empty()) {  // nothing released (only with a lag): the earliest-released job runs early
      const int64_t d = static_cast<int64_t>(pending.top() & kLow);
      pending.pop();
      ready.push(key(deadline(d, c[d]), d));
    }
    on_time = on_time && static_cast<int64_t>(ready.top() >> 32) >= i;
    const int64_t d = static_cast<int64_t>(ready.top() & kLow);
    ready.pop();
    table[i] = static_cast<TT>(d);
    rank[i] = static_cast<int32_t>(c[d]);
    if (++c[d] < m[d]) pending.push(key(release(d, c[d]), d));
  }
  return on_time;
}

void blend_period_table(py::array counts, int64_t period, py::array table_out, py::array rank_out,
                        py::object lag_obj) {
  const int64_t* m = const_data<int64_t>(counts, "counts");
  const int64_t D = counts.shape(0);
  if (period < 1 || period > INT32_MAX) throw std::invalid_argument("period must be in [1, 2^31 - 1]");
  int64_t total = 0;
  for (int64_t d = 0; d < D; ++d) {
    if (m[d] < 0) throw std::invalid_argument("counts must be >= 0");
    total += m[d];
  }
  if (total != period) throw std::invalid_argument("counts must sum to the period");
  const int64_t limit = rank_out.ndim() == 1 ? rank_out.shape(0) : -1;
  if (limit > period) throw std::invalid_argument("rank_out longer than the period");
  int32_t* rank = mutable_data<int32_t>(rank_out, "rank_out", limit);
  std::vector<int64_t> lag_values(static_cast<size_t>(D), 0);
  const bool lagged = !lag_obj.is_none();
  if (lagged) {
    py::array lag_arr = py::reinterpret_borrow<py::array>(lag_obj);
    const int64_t* lag = const_data<int64_t>(lag_arr, "lag");
    if (lag_arr.shape(0) != D) throw std::invalid_argument("lag: expected one value per domain");
    for (int64_t d = 0; d < D; ++d) {
      if (lag[d] <= -(int64_t{1} << 60) || lag[d] >= (int64_t{1} << 60)) throw std::invalid_argument("lag out of range");
      lag_values[d] = lag[d];
    }
  }
  const int64_t* lag = lag_values.data();
  bool on_time;
  if (py::isinstance<py::array_t<uint8_t>>(table_out)) {
    if (D > 256) throw std::invalid_argument("table_out: uint8 holds at most 256 domains");
    uint8_t* t = mutable_data<uint8_t>(table_out, "table_out", limit);
    py::gil_scoped_release nogil;
    on_time = period_loop<uint8_t>(m, lag, D, period, limit, t, rank);
  } else if (py::isinstance<py::array_t<uint16_t>>(table_out)) {
    if (D > 65536) throw std::invalid_argument("table_out: uint16 holds at most 65536 domains");
    uint16_t* t = mutable_data<uint16_t>(table_out, "table_out", limit);
    py::gil_scoped_release nogil;
    on_time = period_loop<uint16_t>(m, lag, D, period, limit, t, rank);
  } else {
    int32_t* t = mutable_data<int32_t>(table_out, "table_out (uint8, uint16 or int32)", limit);
    py::gil_scoped_release nogil;
    on_time = period_loop<int32_t>(m, lag, D, period, limit, t, rank);
  }
  if (!on_time && !lagged) throw std::runtime_error("period schedule missed a deadline (internal error)");
}

// ---------------------------------------------------------------------------------------------------------
// Lookup: j = i - start, q = j div P, r = j mod P, d = table[r], index = offsets[d] + q * counts[d] + rank[r].
struct DivP {
  int64_t P;
  bool pow2;
  int shift;
  double inv;
  explicit DivP(int64_t p) : P(p), pow2((p & (p - 1)) == 0), shift(0), inv(1.0 / static_cast<double>(p)) {
    while ((int64_t{1} << shift) < p) ++shift;
  }
  inline void operator()(int64_t j, int64_t& q, int64_t& r) const {
    if (pow2) {
      q = j >> shift;
      r = j & (P - 1);
    } else if (j < (int64_t{1} << 52)) {
      q = static_cast<int64_t>(static_cast<double>(j) * inv);
      r = j - q * P;
      while (r < 0) {
        --q;
        r += P;
      }
      while (r >= P) {
        ++q;
        r -= P;
      }
    } else {
      q = j / P;
      r = j % P;
    }
  }
};

// Returns -1 on success, else the position of the first bad index.
template <typename TT>
int64_t lookup_loop(const TT* table, const int32_t* rank, int64_t tlen, const int64_t* counts,
                    const int64_t* offsets, int64_t P, int64_t start, const int64_t* idx, int64_t n,
                    int64_t* dom, int64_t* out) {
  const DivP div(P);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t j = idx[k] - start;
    if (j < 0) return k;
    int64_t q, r;
    div(j, q, r);
    if (r >= tlen) return k;
    const int64_t d = static_cast<int64_t>(table[r]);
    dom[k] = d;
    out[k] = offsets[d] + q * counts[d] + static_cast<int64_t>(rank[r]);
  }
  return -1;
}

template <typename TT>
int64_t lookup_range_loop(const TT* table, const int32_t* rank, int64_t tlen, const int64_t* counts,
                          const int64_t* offsets, int64_t P, int64_t start, int64_t first, int64_t n,
                          int64_t* dom, int64_t* out) {
  if (n == 0) return -1;
  const int64_t j0 = first - start;
  if (j0 < 0) return 0;
  int64_t q = j0 / P, r = j0 % P;
  for (int64_t k = 0; k < n;) {
    // Run of consecutive slots r .. min(P, r + n - k) - 1 within one period repetition q.
    const int64_t run = std::min(P - r, n - k);
    if (r + run > tlen) return k + std::max<int64_t>(0, tlen - r);
    for (int64_t s = 0; s < run; ++s) {
      const int64_t d = static_cast<int64_t>(table[r + s]);
      dom[k + s] = d;
      out[k + s] = offsets[d] + q * counts[d] + static_cast<int64_t>(rank[r + s]);
    }
    k += run;
    r = 0;
    ++q;
  }
  return -1;
}

struct LookupArgs {
  const int32_t* rank;
  int64_t tlen;
  const int64_t* counts;
  const int64_t* offsets;
};

LookupArgs check_lookup(const py::array& table, const py::array& rank, const py::array& counts,
                        const py::array& offsets, int64_t period) {
  if (period < 1) throw std::invalid_argument("period must be >= 1");
  LookupArgs a{};
  a.rank = const_data<int32_t>(rank, "rank");
  a.tlen = rank.shape(0);
  if (table.ndim() != 1 || table.shape(0) != a.tlen) throw std::invalid_argument("table and rank lengths differ");
  a.counts = const_data<int64_t>(counts, "counts");
  a.offsets = const_data<int64_t>(offsets, "offsets");
  if (offsets.shape(0) != counts.shape(0)) throw std::invalid_argument("counts and offsets lengths differ");
  return a;
}

template <typename F>
int64_t dispatch_table(const py::array& table, F&& f) {
  if (py::isinstance<py::array_t<uint8_t>>(table)) return f(const_data<uint8_t>(table, "table"));
  if (py::isinstance<py::array_t<uint16_t>>(table)) return f(const_data<uint16_t>(table, "table"));
  return f(const_data<int32_t>(table, "table (uint8, uint16 or int32)"));
}

void raise_bad_index(int64_t bad, int64_t value, int64_t start, int64_t tlen) {
  throw std::out_of_range("global index " + std::to_string(value) + " (position " + std::to_string(bad) +
                          ") is before the segment start " + std::to_string(start) +
                          " or beyond the built table (" + std::to_string(tlen) + " slots)");
}

void blend_lookup(py::array table, py::array rank, py::array counts, py::array offsets, int64_t period,
                  int64_t start, py::array indices, py::array domain_out, py::array index_out) {
  const LookupArgs a = check_lookup(table, rank, counts, offsets, period);
  const int64_t* idx = const_data<int64_t>(indices, "indices");
  const int64_t n = indices.shape(0);
  int64_t* dom = mutable_data<int64_t>(domain_out, "domain_out", n);
  int64_t* out = mutable_data<int64_t>(index_out, "index_out", n);
  const int64_t bad = dispatch_table(table, [&](const auto* t) {
    py::gil_scoped_release nogil;
    return lookup_loop(t, a.rank, a.tlen, a.counts, a.offsets, period, start, idx, n, dom, out);
  });
  if (bad >= 0) raise_bad_index(bad, idx[bad], start, a.tlen);
}

void blend_lookup_range(py::array table, py::array rank, py::array counts, py::array offsets, int64_t period,
                        int64_t start, int64_t first, py::array domain_out, py::array index_out) {
  const LookupArgs a = check_lookup(table, rank, counts, offsets, period);
  const int64_t n = domain_out.ndim() == 1 ? domain_out.shape(0) : -1;
  int64_t* dom = mutable_data<int64_t>(domain_out, "domain_out", n);
  int64_t* out = mutable_data<int64_t>(index_out, "index_out", n);
  const int64_t bad = dispatch_table(table, [&](const auto* t) {
    py::gil_scoped_release nogil;
    return lookup_range_loop(t, a.rank, a.tlen, a.counts, a.offsets, period, start, first, n, dom, out);
  });
  if (bad >= 0) raise_bad_index(bad, first + bad, start, a.tlen);
}

}  // namespace

void register_blending(py::module_& m) {
  m.def("blend_exact", &blend_exact, py::arg("weights"), py::arg("start"), py::arg("counts"),
        py::arg("domain_out"), py::arg("sample_out"),
        "Megatron's exact blending greedy for samples [start, start + n), resuming from counts (updated).");
  m.def("blend_exact_megatron", &blend_exact_megatron, py::arg("weights"), py::arg("domain_out"),
        py::arg("sample_out"), "A plain re-implementation of Megatron-LM's build_blending_indices loop (benchmark baseline).");
  m.def("blend_period_table", &blend_period_table, py::arg("counts"), py::arg("period"), py::arg("table_out"),
        py::arg("rank_out"), py::arg("lag") = py::none(),
        "First len(rank_out) slots of the EDF period schedule of integer counts (lag: int64 per-domain carry).");
  m.def("blend_lookup", &blend_lookup, py::arg("table"), py::arg("rank"), py::arg("counts"), py::arg("offsets"),
        py::arg("period"), py::arg("start"), py::arg("indices"), py::arg("domain_out"), py::arg("index_out"),
        "Periodic blend lookup of arbitrary global indices.");
  m.def("blend_lookup_range", &blend_lookup_range, py::arg("table"), py::arg("rank"), py::arg("counts"),
        py::arg("offsets"), py::arg("period"), py::arg("start"), py::arg("first"), py::arg("domain_out"),
        py::arg("index_out"), "Periodic blend lookup of the consecutive global indices first .. first + n - 1.");
}
