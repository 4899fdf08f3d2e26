// Sequence packing (sample index) and batched sample reads.
//
// build_sample_index: for documents laid end to end in epoch order, the (document position, offset) of
//   every sample start j*L, j = 0..S, as a linear merge (O(D + S)), identical to the numpy searchsorted fallback.
// gather_samples: copies L+1 tokens per requested sample out of the memory-mapped shards into a 2-D array,
//   crossing document boundaries, converting the shard dtype to the output dtype on the fly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

py::array_t<int64_t> build_sample_index(py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_lengths,
                                        int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be > 0");
  auto len = doc_lengths.unchecked<1>();
  const int64_t num_docs = len.shape(0);
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  auto idx = out.mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t doc = 0;         // position in the epoch's document order
    int64_t doc_start = 0;   // flat token position where `doc` starts
    for (int64_t j = 0; j <= num_samples; ++j) {
      const int64_t pos = j * seq_length;
      // advance to the document containing `pos` (skipping empty documents)
      while (doc < num_docs && doc_start + len(doc) <= pos) {
        doc_start += len(doc);
        ++doc;
      }
      if (doc >= num_docs) throw std::out_of_range("sample start beyond the end of the token stream");
      idx(j, 0) = doc;
      idx(j, 1) = pos - doc_start;
    }
  }
  return out;
}

template <typename In, typename Out>
void gather_typed(const std::vector<const In*>& shards, const int64_t* order, const int32_t* doc_shard,
                  const int64_t* doc_start, const int64_t* doc_len, int64_t num_docs, const int64_t* start_doc,
                  const int64_t* start_off, int64_t n, int64_t width, Out* out) {
  for (int64_t s = 0; s < n; ++s) {
    int64_t doc = start_doc[s];
    int64_t off = start_off[s];
    Out* dst = out + s * width;
    int64_t need = width;
    while (need > 0) {
      if (doc >= num_docs) throw std::out_of_range("sample runs past the end of the epoch's token stream");
      const int64_t d = order[doc];
      const int64_t avail = doc_len[d] - off;
      const int64_t take = avail < need ? avail : need;
      const In* src = shards[doc_shard[d]] + doc_start[d] + off;
      if constexpr (std::is_same_v<In, Out>) {
        std::memcpy(dst, src, static_cast<size_t>(take) * sizeof(Out));
      } else {
        for (int64_t t = 0; t < take; ++t) dst[t] = static_cast<Out>(src[t]);
      }
      dst += take;
      need -= take;
      ++doc;
      off = 0;
    }
  }
}

template <typename In>
void gather_dispatch_out(const std::vector<const In*>& shards, const int64_t* order, const int32_t* doc_shard,
                         const int64_t* doc_start,
                         const int64_t* doc_len, int64_t num_docs, const int64_t* sd, const int64_t* so, int64_t n,
                         int64_t width, py::array& out) {
  if (out.dtype().is(py::dtype::of<int64_t>())) {
    gather_typed<In, int64_t>(shards, order, doc_shard, doc_start, doc_len, num_docs, sd, so, n, width,
                              static_cast<int64_t*>(out.mutable_data()));
  } else if (out.dtype().is(py::dtype::of<In>())) {
    gather_typed<In, In>(shards, order, doc_shard, doc_start, doc_len, num_docs, sd, so, n, width,
                         static_cast<In*>(out.mutable_data()));
  } else {
    throw std::invalid_argument("gather_samples: output dtype must be int64 or the shard dtype");
  }
}

void gather_samples(py::list shard_tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> order,
                    py::array_t<int32_t, py::array::c_style | py::array::forcecast> doc_shard,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_start,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_len,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> start_doc,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> start_off, py::array out) {
  if (shard_tokens.empty()) throw std::invalid_argument("gather_samples: no shards");
  if (out.ndim() != 2 || !(out.flags() & py::array::c_style))
    throw std::invalid_argument("gather_samples: out must be a C-contiguous 2-D array");
  const int64_t n = out.shape(0);
  const int64_t width = out.shape(1);
  if (start_doc.size() != n || start_off.size() != n)
    throw std::invalid_argument("gather_samples: start arrays must have one entry per output row");
  const int64_t num_docs = order.size();
  if (doc_shard.size() != doc_len.size() || doc_start.size() != doc_len.size())
    throw std::invalid_argument("gather_samples: doc_shard/doc_start/doc_len lengths differ");
  for (int64_t s = 0; s < n; ++s)
    if (start_doc.data()[s] < 0 || start_doc.data()[s] >= num_docs)
      throw std::out_of_range("gather_samples: start document outside the epoch order");

  py::array first = shard_tokens[0].cast<py::array>();
  const py::dtype dt = first.dtype();
  std::vector<py::array> keep;  // holds references while the GIL is released
  std::vector<const void*> ptrs;
  for (auto item : shard_tokens) {
    py::array a = item.cast<py::array>();
    if (!a.dtype().is(dt)) throw std::invalid_argument("gather_samples: all shards of a domain must share a dtype");
    if (a.ndim() != 1 || !(a.flags() & py::array::c_style))
      throw std::invalid_argument("gather_samples: shard token arrays must be contiguous 1-D");
    ptrs.push_back(a.data());
    keep.push_back(a);
  }
  const int64_t* ord = order.data();
  const int32_t* ds = doc_shard.data();
  const int64_t* dst = doc_start.data();
  const int64_t* dl = doc_len.data();
  const int64_t* sd = start_doc.data();
  const int64_t* so = start_off.data();

#define MD_GATHER(T)                                                              \
  {                                                                               \
    std::vector<const T*> shards;                                                 \
    for (auto p : ptrs) shards.push_back(static_cast<const T*>(p));              \
    py::gil_scoped_release release;                                               \
    gather_dispatch_out<T>(shards, ord, ds, dst, dl, num_docs, sd, so, n, width, out); \
    return;                                                                       \
  }
  if (dt.is(py::dtype::of<uint16_t>())) MD_GATHER(uint16_t)
  if (dt.is(py::dtype::of<int32_t>())) MD_GATHER(int32_t)
  if (dt.is(py::dtype::of<int64_t>())) MD_GATHER(int64_t)
  if (dt.is(py::dtype::of<uint8_t>())) MD_GATHER(uint8_t)
  if (dt.is(py::dtype::of<int16_t>())) MD_GATHER(int16_t)
  if (dt.is(py::dtype::of<int8_t>())) MD_GATHER(int8_t)
#undef MD_GATHER
  throw std::invalid_argument("gather_samples: unsupported token dtype");
}

// A keyed pseudo-random permutation of [0, n): a 4-round balanced Feistel network on 2h bits
// (2^(2h) >= n) with splitmix64 round functions, made a bijection on [0, n) by cycle walking. Lets the
// loader shuffle with sequential memory access and no random gathers; megatron_doremi.data.sequences has the
// numpy twin (feistel_permutation_numpy), which must give identical output.
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

struct Feistel {
  int half_bits;
  uint64_t mask;
  uint64_t keys[4];
  uint64_t n;
  inline uint64_t once(uint64_t x) const {
    uint64_t left = x >> half_bits, right = x & mask;
    for (int r = 0; r < 4; ++r) {
      const uint64_t next = left ^ (splitmix64(right ^ keys[r]) & mask);
      left = right;
      right = next;
    }
    return (left << half_bits) | right;
  }
  inline uint64_t operator()(uint64_t x) const {
    do {
      x = once(x);
    } while (x >= n);
    return x;
  }
};

Feistel make_feistel(int64_t n, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys) {
  if (n <= 0) throw std::invalid_argument("permutation size must be > 0");
  if (keys.size() != 4) throw std::invalid_argument("need 4 round keys");
  Feistel f;
  int bits = 0;
  while ((uint64_t(1) << bits) < static_cast<uint64_t>(n)) ++bits;
  f.half_bits = bits < 2 ? 1 : (bits + 1) / 2;
  f.mask = (uint64_t(1) << f.half_bits) - 1;
  for (int r = 0; r < 4; ++r) f.keys[r] = keys.data()[r];
  f.n = static_cast<uint64_t>(n);
  return f;
}

py::array_t<int64_t> feistel_permutation(int64_t n, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys) {
  const Feistel f = make_feistel(n, keys);
  py::array_t<int64_t> out(n);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<int64_t>(f(static_cast<uint64_t>(i)));
  }
  return out;
}

py::array_t<int64_t> feistel_apply(int64_t n, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys,
                                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> xs) {
  const Feistel f = make_feistel(n, keys);
  py::array_t<int64_t> out(xs.size());
  const int64_t* x = xs.data();
  int64_t* o = out.mutable_data();
  const int64_t m = xs.size();
  for (int64_t i = 0; i < m; ++i) {
    if (x[i] < 0 || x[i] >= n) throw std::out_of_range("feistel_apply: index outside [0, n)");
  }
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < m; ++i) o[i] = static_cast<int64_t>(f(static_cast<uint64_t>(x[i])));
  }
  return out;
}

// Sample index over documents visited in `order` (lengths[order[i]]), avoiding a gathered copy.
py::array_t<int64_t> build_sample_index_ordered(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_lengths,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> order, int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be > 0");
  const int64_t* len = doc_lengths.data();
  const int64_t* ord = order.data();
  const int64_t num_docs = order.size();
  for (int64_t i = 0; i < num_docs; ++i)
    if (ord[i] < 0 || ord[i] >= doc_lengths.size()) throw std::out_of_range("order entry outside the documents");
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t* idx = out.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t doc = 0, doc_start = 0;
    for (int64_t j = 0; j <= num_samples; ++j) {
      const int64_t pos = j * seq_length;
      while (doc < num_docs && doc_start + len[ord[doc]] <= pos) {
        doc_start += len[ord[doc]];
        ++doc;
      }
      if (doc >= num_docs) throw std::out_of_range("sample start beyond the end of the token stream");
      idx[2 * j] = doc;
      idx[2 * j + 1] = pos - doc_start;
    }
  }
  return out;
}

}  // namespace

void register_sequences(py::module_& m) {
  m.def("build_sample_index", &build_sample_index, py::arg("doc_lengths"), py::arg("seq_length"),
        py::arg("num_samples"),
        "int64 [num_samples+1, 2] (document position, token offset) of each sample start j*seq_length.");
  m.def("gather_samples", &gather_samples, py::arg("shard_tokens"), py::arg("order"), py::arg("doc_shard"), py::arg("doc_start"),
        py::arg("doc_len"), py::arg("start_doc"), py::arg("start_off"), py::arg("out"),
        "Copy out.shape[1] tokens per sample starting at (epoch position start_doc, start_off) into out;\n"
        "epoch position p is document order[p].");
  m.def("feistel_permutation", &feistel_permutation, py::arg("n"), py::arg("keys"),
        "int64 [n]: the keyed Feistel permutation of [0, n) applied to 0..n-1.");
  m.def("feistel_apply", &feistel_apply, py::arg("n"), py::arg("keys"), py::arg("xs"),
        "The keyed Feistel permutation of [0, n) applied to xs.");
  m.def("build_sample_index_ordered", &build_sample_index_ordered, py::arg("doc_lengths"), py::arg("order"),
        py::arg("seq_length"), py::arg("num_samples"),
        "build_sample_index over documents visited in `order`.");
}
