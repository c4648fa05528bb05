// A custom autograd node whose forward and backward are Rust callbacks (`ta_function_apply`),
// so the quantizers' straight-through gradients are single native nodes.
#include <ATen/MemoryOverlap.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "border.h"

using ta::dup;
using ta::guard;
using ta::rethrow;

namespace {

constexpr int64_t kMax = 8;

// Rust callbacks. `params` is the byte blob given to ta_function_apply (kept alive by the node).
// Forward: fills up to kMax outputs and up to kMax tensors to save (NULL ends each list).
typedef char* (*forward_fn)(const void* params, at::Tensor** inputs, int64_t n_inputs,
                            at::Tensor** outputs, at::Tensor** saved);
// Backward: from the saved tensors and the outputs' gradients, one gradient per input (NULL:
// none); `needs[i]` says whether input i's gradient is wanted at all, `owned[j]` whether
// output j's gradient is held by nothing but this call (so it may be overwritten).
typedef char* (*backward_fn)(const void* params, at::Tensor** saved, int64_t n_saved,
                             at::Tensor** grad_outputs, int64_t n_outputs, const uint8_t* needs,
                             const uint8_t* owned, at::Tensor** grad_inputs);

// Whether `g` may be overwritten: one handle (the engine's buffer, moved into this call), no
// graph to differentiate through, and no other tensor on its memory, where a view (a linear
// layer's weight gradient is the transpose of a fresh product) counts its base, held by the
// view alone. AccumulateGrad's rule for stealing a gradient, made strict enough to write it.
bool exclusively_held(const at::Tensor& g) {
  if (!g.defined() || g.requires_grad() || at::GradMode::is_enabled() || g.use_count() != 1 || !g.has_storage() ||
      at::has_internal_overlap(g) != at::MemOverlap::No) {
    return false;
  }
  if (!g.is_view()) return g.storage().use_count() == 1;
  return g._base().use_count() == 1 && g.storage().use_count() == 2;
}

// Takes ownership of the tensors a Rust callback handed over (each a `new at::Tensor`).
std::vector<at::Tensor> take(at::Tensor** ptrs) {
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < kMax && ptrs[i] != nullptr; ++i) {
    out.push_back(std::move(*ptrs[i]));
    delete ptrs[i];
    ptrs[i] = nullptr;
  }
  return out;
}

struct RustFunction : public torch::autograd::Function<RustFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList inputs, int64_t fwd, int64_t bwd,
                                                std::string params) {
    std::vector<at::Tensor> in(inputs.begin(), inputs.end());
    std::vector<at::Tensor*> in_ptrs;
    for (auto& t : in) in_ptrs.push_back(&t);
    at::Tensor* outs[kMax] = {nullptr};
    at::Tensor* saved[kMax] = {nullptr};
    char* err = reinterpret_cast<forward_fn>(fwd)(params.data(), in_ptrs.data(),
                                                  static_cast<int64_t>(in.size()), outs, saved);
    // Whatever was handed over is owned here, error or not.
    auto out_list = take(outs);
    auto saved_list = take(saved);
    rethrow(err);
    ctx->save_for_backward(saved_list);
    ctx->saved_data["bwd"] = bwd;
    ctx->saved_data["params"] = params;
    ctx->saved_data["n_inputs"] = static_cast<int64_t>(in.size());
    return out_list;
  }

  // `grads` by reference: the engine's list itself, so that a gradient nobody else holds
  // has one handle (by value, the list would be copied and every count raised).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    auto saved = ctx->get_saved_variables();
    auto bwd = reinterpret_cast<backward_fn>(ctx->saved_data["bwd"].toInt());
    const std::string params = ctx->saved_data["params"].toStringRef();
    const int64_t n_inputs = ctx->saved_data["n_inputs"].toInt();
    std::vector<at::Tensor*> saved_ptrs, grad_ptrs;
    for (auto& t : saved) saved_ptrs.push_back(&t);
    std::vector<uint8_t> owned(kMax, 0);
    for (size_t j = 0; j < grads.size(); ++j) {
      grad_ptrs.push_back(&grads[j]);
      if (j < static_cast<size_t>(kMax)) owned[j] = exclusively_held(grads[j]) ? 1 : 0;
    }
    // kMax slots each, so that a callback can never write or read past them.
    std::vector<at::Tensor*> grad_in(kMax, nullptr);
    std::vector<uint8_t> needs(kMax, 0);
    for (int64_t i = 0; i < n_inputs; ++i) needs[i] = ctx->needs_input_grad(static_cast<size_t>(i)) ? 1 : 0;
    char* err = bwd(params.data(), saved_ptrs.data(), static_cast<int64_t>(saved.size()),
                    grad_ptrs.data(), static_cast<int64_t>(grads.size()), needs.data(), owned.data(),
                    grad_in.data());
    torch::autograd::variable_list result;
    for (int64_t i = 0; i < kMax; ++i) {
      at::Tensor* g = grad_in[i];
      if (i < n_inputs) result.push_back(g == nullptr ? at::Tensor() : std::move(*g));
      delete g;
    }
    rethrow(err);
    // No gradient for the callbacks and the parameter blob.
    result.resize(static_cast<size_t>(n_inputs) + 3);
    return result;
  }
};

}  // namespace

extern "C" {

// Applies a custom autograd node: `fwd` computes the outputs (written to `outputs`, up to 8,
// count in `n_outputs`), `bwd` their inputs' gradients. `params` (`params_len` bytes) is copied
// into the node and passed to both.
char* ta_function_apply(void* fwd, void* bwd, const void* params, size_t params_len,
                        at::Tensor** inputs, int64_t n_inputs, at::Tensor** outputs,
                        int64_t* n_outputs) {
  return guard([&] {
    std::vector<at::Tensor> in;
    for (int64_t i = 0; i < n_inputs; ++i) in.push_back(*inputs[i]);
    auto out = RustFunction::apply(at::TensorList(in), reinterpret_cast<int64_t>(fwd),
                                   reinterpret_cast<int64_t>(bwd),
                                   std::string(static_cast<const char*>(params), params_len));
    TORCH_CHECK(static_cast<int64_t>(out.size()) <= kMax, "too many outputs");
    *n_outputs = static_cast<int64_t>(out.size());
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = new at::Tensor(std::move(out[i]));
  });
}

// libtorch's convolution backward (which tch does not bind), for a Rust node that runs a
// convolution inside: the gradients of `x`, `w` and a bias of `w`'s output channels where
// `mask` asks, into `*gx`, `*gw` and `*gb` (`new at::Tensor`s, left null where not asked);
// `geometry` is [stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups].
char* ta_convolution_backward(const at::Tensor* g, const at::Tensor* x, const at::Tensor* w,
                              const int64_t* geometry, const uint8_t* mask, at::Tensor** gx,
                              at::Tensor** gw, at::Tensor** gb) {
  return guard([&] {
    const std::vector<int64_t> bias_sizes{w->size(0)};
    auto grads = at::convolution_backward(
        *g, *x, *w, at::IntArrayRef(bias_sizes), {geometry[0], geometry[1]}, {geometry[2], geometry[3]},
        {geometry[4], geometry[5]}, false, {0, 0}, geometry[6], {mask[0] != 0, mask[1] != 0, mask[2] != 0});
    if (mask[0] != 0) *gx = new at::Tensor(std::move(std::get<0>(grads)));
    if (mask[1] != 0) *gw = new at::Tensor(std::move(std::get<1>(grads)));
    if (mask[2] != 0) *gb = new at::Tensor(std::move(std::get<2>(grads)));
  });
}

}  // extern "C"
