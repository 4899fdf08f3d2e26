// Sequence packing (sample index) and batched sample reads.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_sequences(py::module_& m) { (void)m; }
