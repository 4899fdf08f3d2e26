// megatron_doremi._helpers: native index builders for the data pipeline.
//
// The module is split by job: blending.cpp (domain interleaving by weight),
// sequences.cpp (document packing into fixed-length samples, batched reads).
// Each file registers its own functions here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_blending(py::module_& m);
void register_sequences(py::module_& m);

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "Native index builders for megatron-doremi (blending, packing, batched reads).";
  register_blending(m);
  register_sequences(m);
}
