// Torch glue for the CUDA kernels of domain_loss_cuda.cu: checks tensors, fills the plain argument structs of
// domain_loss_cuda.h and launches on the stream the caller passes (an integer cudaStream_t, from
// torch.cuda.current_stream().cuda_stream; the caller also makes the logits' device current). Needs only torch's
// CPU headers, so it compiles with any torch build; it is linked with the .cu object into one extension.
#include <torch/extension.h>

#include <cstdint>

#include "domain_loss_cuda.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kMdlFloat32;
    case at::kHalf: return kMdlFloat16;
    case at::kBFloat16: return kMdlBFloat16;
    default: TORCH_CHECK(false, "domain_loss_cuda: logits must be fp32, fp16 or bf16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "domain_loss_cuda: ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "domain_loss_cuda: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "domain_loss_cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, "domain_loss_cuda: ", name, " must have ", numel, " elements, got ", t.numel());
}

void raise_on_error(int code, const char* what) {
  TORCH_CHECK(code == 0, "domain_loss_cuda: ", what, " launch failed: ", mdl_error_string(code));
}

// Checks the logits and fills the fields both argument structs share: dtype, pointer, [B, T, V] and strides.
template <typename Args>
void set_logits(Args& a, const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3, "domain_loss_cuda: logits must be a CUDA [B, T, V] tensor");
  a.dtype = dtype_code(logits);
  a.logits = logits.data_ptr();
  a.batch = logits.size(0);
  a.seq = logits.size(1);
  a.vocab = logits.size(2);
  a.sb = logits.stride(0);
  a.st = logits.stride(1);
  a.sv = logits.stride(2);
}

void forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& domain_ids,
             const at::Tensor& ref, int64_t ignore_index, at::Tensor token_loss, at::Tensor lse,
             at::Tensor domain_loss_sum, at::Tensor domain_excess_sum, at::Tensor domain_token_count,
             int64_t stream) {
  MdlForwardArgs a{};
  set_logits(a, logits);
  const at::Device dev = logits.device();
  const int64_t batch = a.batch, seq = a.seq;
  const int64_t num_domains = domain_loss_sum.numel();
  check_cuda(labels, "labels", at::kLong, batch * seq, dev);
  check_cuda(domain_ids, "domain_ids", at::kLong, batch, dev);
  const bool has_ref = ref.numel() > 0;
  if (has_ref) check_cuda(ref, "ref", at::kFloat, batch * seq, dev);
  check_cuda(token_loss, "token_loss", at::kFloat, batch * seq, dev);
  check_cuda(lse, "lse", at::kFloat, batch * seq, dev);
  check_cuda(domain_loss_sum, "domain_loss_sum", at::kDouble, num_domains, dev);
  check_cuda(domain_excess_sum, "domain_excess_sum", at::kDouble, num_domains, dev);
  check_cuda(domain_token_count, "domain_token_count", at::kDouble, num_domains, dev);
  at::Tensor rows = at::empty({3, batch}, domain_loss_sum.options());
  a.labels = labels.data_ptr<int64_t>();
  a.domain_ids = domain_ids.data_ptr<int64_t>();
  a.ref = has_ref ? ref.data_ptr<float>() : nullptr;
  a.num_domains = num_domains;
  a.ignore_index = ignore_index;
  a.token_loss = token_loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.row_loss = rows.data_ptr<double>();
  a.row_excess = a.row_loss + batch;
  a.row_count = a.row_loss + 2 * batch;
  a.dom_loss = domain_loss_sum.data_ptr<double>();
  a.dom_excess = domain_excess_sum.data_ptr<double>();
  a.dom_count = domain_token_count.data_ptr<double>();
  raise_on_error(mdl_forward(a, reinterpret_cast<void*>(stream)), "forward");
}

void backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& row_coef,
              int64_t ignore_index, at::Tensor grad, int64_t stream) {
  MdlBackwardArgs a{};
  set_logits(a, logits);
  const at::Device dev = logits.device();
  const int64_t batch = a.batch, seq = a.seq;
  check_cuda(labels, "labels", at::kLong, batch * seq, dev);
  check_cuda(lse, "lse", at::kFloat, batch * seq, dev);
  check_cuda(row_coef, "row_coef", at::kFloat, batch, dev);
  TORCH_CHECK(grad.device() == dev && grad.scalar_type() == logits.scalar_type() && grad.sizes() == logits.sizes(),
              "domain_loss_cuda: grad must have the logits' device, dtype and shape");
  a.grad = grad.data_ptr();
  a.gb = grad.stride(0);
  a.gt = grad.stride(1);
  a.gv = grad.stride(2);
  a.labels = labels.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.lse = lse.data_ptr<float>();
  a.row_coef = row_coef.data_ptr<float>();
  raise_on_error(mdl_backward(a, reinterpret_cast<void*>(stream)), "backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_doremi fused per-domain cross-entropy, CUDA kernels";
  m.def("forward", &forward, "per-token loss / lse and fixed-order per-domain fp64 sums (fills the outputs)",
        py::arg("logits"), py::arg("labels"), py::arg("domain_ids"), py::arg("ref"), py::arg("ignore_index"),
        py::arg("token_loss"), py::arg("lse"), py::arg("domain_loss_sum"), py::arg("domain_excess_sum"),
        py::arg("domain_token_count"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "grad = row_coef[b] * (softmax - onehot(label)), written into grad",
        py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("row_coef"), py::arg("ignore_index"),
        py::arg("grad"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
