// Plain-C++ interface of the CUDA kernels in domain_loss_cuda.cu (no torch, no CUDA types), shared with the
// torch glue in domain_loss_cuda_binding.cpp. Pointers are device pointers; strides are in elements; `stream`
// is a cudaStream_t. Functions return a cudaError_t value (0 = success); mdl_error_string describes one.
#pragma once

#include <cstdint>

enum MdlDtype : int { kMdlFloat32 = 0, kMdlFloat16 = 1, kMdlBFloat16 = 2 };

struct MdlForwardArgs {
  int dtype;                  // MdlDtype of the logits
  const void* logits;         // [B, T, V] with strides (sb, st, sv)
  int64_t batch, seq, vocab;  // B, T, V
  int64_t sb, st, sv;
  const int64_t* labels;      // [B, T] contiguous
  const int64_t* domain_ids;  // [B] contiguous, values in [0, D)
  const float* ref;           // [B, T] contiguous fp32, or nullptr (excess = loss)
  int64_t num_domains;        // D
  int64_t ignore_index;
  float* token_loss;          // out [B, T] fp32
  float* lse;                 // out [B, T] fp32 (saved for backward)
  double* row_loss;           // scratch [B]
  double* row_excess;         // scratch [B]
  double* row_count;          // scratch [B]
  double* dom_loss;           // out [D]
  double* dom_excess;         // out [D]
  double* dom_count;          // out [D]
};

struct MdlBackwardArgs {
  int dtype;                  // MdlDtype of logits and grad
  const void* logits;         // [B, T, V] strides (sb, st, sv)
  int64_t batch, seq, vocab;
  int64_t sb, st, sv;
  void* grad;                 // out [B, T, V] strides (gb, gt, gv); may be the logits' own storage
  int64_t gb, gt, gv;
  const int64_t* labels;      // [B, T] contiguous
  int64_t ignore_index;
  const float* lse;           // [B, T] from the forward
  const float* row_coef;      // [B]: dloss/dtoken_loss for the tokens of row b (scale[d(b)] * g / normalizer)
};

int mdl_forward(const MdlForwardArgs& args, void* stream);
int mdl_backward(const MdlBackwardArgs& args, void* stream);
const char* mdl_error_string(int code);
