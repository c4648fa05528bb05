// TorchScript operators of the crate, `torchapprox::lut_linear` and `torchapprox::lut_conv2d`:
// a rewritten layer in approximate mode calls them from its TorchScript forward. Their
// kernels are Rust callbacks (`ta_ops_install`), so the table GEMM stays in Rust.
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

std::atomic<linear_fn> g_linear{nullptr};
std::atomic<conv_fn> g_conv{nullptr};

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

}  // namespace

// Registered when the library loads; the kernels work once Rust installed its callbacks.
TORCH_LIBRARY(torchapprox, m) {
  m.def("lut_linear(Tensor x, Tensor w, int multiplier) -> Tensor", &lut_linear);
  m.def(
      "lut_conv2d(Tensor x, Tensor w, int multiplier, int[] stride, int[] padding, int[] dilation, int groups) "
      "-> Tensor",
      &lut_conv2d);
}

extern "C" {

// Installs the Rust kernels of the operators (idempotent).
char* ta_ops_install(linear_fn linear, conv_fn conv) {
  return guard([&] {
    g_linear.store(linear);
    g_conv.store(conv);
  });
}

}  // extern "C"
