// TorchScript operators of the crate: `torchapprox::lut_linear` and `torchapprox::lut_conv2d`
// (a rewritten layer in approximate mode calls them from its TorchScript forward), and
// `torchapprox::pact_scaled` / `torchapprox::minmax_scaled` / `torchapprox::minmax_weight` (the
// quantizers' fused kernels and single autograd nodes, which a rewritten layer calls in memory).
// Their kernels are Rust callbacks (`ta_ops_install`), so the numerics stay in Rust.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>

#include "border.h"

using ta::guard;
using ta::rethrow;

namespace {

// Rust callbacks: the table products of integer-valued `x` and `w` through the multiplier
// registered as `multiplier`, into `*out` (a `new at::Tensor`); `geometry` is
// [stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups].
typedef char* (*linear_fn)(const at::Tensor* x, const at::Tensor* w, int64_t multiplier, at::Tensor** out);
typedef char* (*conv_fn)(const at::Tensor* x, const at::Tensor* w, int64_t multiplier,
                         const int64_t* geometry, at::Tensor** out);

// Quantizes `x` (PACT with `alpha` when `alpha` is not null, else MinMax over x's own range,
// per channel when `per_channel`): the integers into `*values`, the scale into `*scale`.
// `into`, when not null, is a tensor no other tensor shares memory with, which the integers may
// be written into (`*values` then shares its memory); `scratch` allows the thread's scratch
// memory instead where no gradient is recorded (inputs, whose integers die with the call's op).
typedef char* (*quant_fn)(const at::Tensor* x, const at::Tensor* alpha, const at::Tensor* into, int64_t scratch,
                          int64_t int_max, int64_t rounded, int64_t per_channel, at::Tensor** values,
                          at::Tensor** scale);

std::atomic<linear_fn> g_linear{nullptr};
std::atomic<conv_fn> g_conv{nullptr};
std::atomic<quant_fn> g_quant{nullptr};

at::Tensor take(char* err, at::Tensor* out) {
  if (err != nullptr) {
    delete out;
    rethrow(err);
  }
  TORCH_CHECK(out != nullptr, "torchapprox operator returned no tensor");
  at::Tensor result = std::move(*out);
  delete out;
  return result;
}

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& w, int64_t multiplier) {
  auto f = g_linear.load();
  TORCH_CHECK(f != nullptr, "torchapprox::lut_linear runs inside the torchapprox crate only");
  at::Tensor* out = nullptr;
  char* err = f(&x, &w, multiplier, &out);
  return take(err, out);
}

at::Tensor lut_conv2d(const at::Tensor& x, const at::Tensor& w, int64_t multiplier, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto f = g_conv.load();
  TORCH_CHECK(f != nullptr, "torchapprox::lut_conv2d runs inside the torchapprox crate only");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "torchapprox::lut_conv2d takes two strides, paddings and dilations");
  const int64_t geometry[7] = {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
  at::Tensor* out = nullptr;
  char* err = f(&x, &w, multiplier, geometry, &out);
  return take(err, out);
}

std::tuple<at::Tensor, at::Tensor> quantized(const at::Tensor& x, const at::Tensor* alpha, const at::Tensor* into,
                                             bool scratch, int64_t int_max, bool rounded, bool per_channel) {
  auto f = g_quant.load();
  TORCH_CHECK(f != nullptr, "torchapprox's quantizer operators run inside the torchapprox crate only");
  at::Tensor* values = nullptr;
  at::Tensor* scale = nullptr;
  char* err = f(&x, alpha, into, scratch ? 1 : 0, int_max, rounded ? 1 : 0, per_channel ? 1 : 0, &values, &scale);
  if (err != nullptr) delete scale;
  at::Tensor v = take(err, values);
  return {v, take(nullptr, scale)};
}

std::tuple<at::Tensor, at::Tensor> pact_scaled(const at::Tensor& x, const at::Tensor& alpha, int64_t int_max,
                                               bool rounded) {
  return quantized(x, &alpha, nullptr, true, int_max, rounded, false);
}

std::tuple<at::Tensor, at::Tensor> minmax_scaled(const at::Tensor& x, int64_t int_max, bool rounded,
                                                 bool per_channel) {
  return quantized(x, nullptr, nullptr, true, int_max, rounded, per_channel);
}

// Whether no other tensor (a view, an alias an autograd graph saved) shares `t`'s storage.
// Handles to `t` itself are not counted: a layer's cache is read only by the layer.
bool unshared(const at::Tensor& t) {
  return t.defined() && t.has_storage() && t.storage().use_count() == 1 && !t.is_view();
}

// As minmax_scaled, reusing `buffer` (a layer's kept copy of its quantized weight) for the
// integers where it is unshared: a weight-sized allocation per step costs more in page faults
// than the pass that fills it. Never the scratch: the layer keeps what this returns.
std::tuple<at::Tensor, at::Tensor> minmax_weight(const at::Tensor& w, const at::Tensor& buffer, int64_t int_max,
                                                 bool rounded, bool per_channel) {
  return quantized(w, nullptr, unshared(buffer) ? &buffer : nullptr, false, int_max, rounded, per_channel);
}

}  // namespace

// Registered when the library loads; the kernels work once Rust installed its callbacks.
TORCH_LIBRARY(torchapprox, m) {
  m.def("lut_linear(Tensor x, Tensor w, int multiplier) -> Tensor", &lut_linear);
  m.def(
      "lut_conv2d(Tensor x, Tensor w, int multiplier, int[] stride, int[] padding, int[] dilation, int groups) "
      "-> Tensor",
      &lut_conv2d);
  // Catch-all kernels run under autograd: the Rust kernel builds the quantizer's own node.
  m.def("pact_scaled(Tensor x, Tensor alpha, int int_max, bool rounded) -> (Tensor, Tensor)", &pact_scaled);
  m.def("minmax_scaled(Tensor x, int int_max, bool rounded, bool per_channel) -> (Tensor, Tensor)",
        &minmax_scaled);
  // It may write `buffer` and return its memory: TorchScript must not reorder it around other
  // uses of the buffer, so its alias analysis is the conservative one.
  m.def(torch::schema("minmax_weight(Tensor w, Tensor buffer, int int_max, bool rounded, bool per_channel) -> "
                      "(Tensor, Tensor)",
                      c10::AliasAnalysisKind::CONSERVATIVE),
        &minmax_weight);
}

extern "C" {

// Whether nothing but `t`'s own handles reaches its memory (1) or something does (0).
int ta_tensor_unshared(const at::Tensor* t) {
  try {
    return unshared(*t) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// Installs the Rust kernels of the operators (idempotent).
char* ta_ops_install(linear_fn linear, conv_fn conv, quant_fn quant) {
  return guard([&] {
    g_linear.store(linear);
    g_conv.store(conv);
    g_quant.store(quant);
  });
}

}  // extern "C"
