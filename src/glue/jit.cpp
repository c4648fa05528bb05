// TorchScript module surgery (`ta_module_*`): read submodules, graphs and tensors, add
// quantizer submodules, replace a class's forward, and serialize a module to memory.
#include <ATen/ATen.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/inliner.h>

#include <functional>
#include <map>
#include <sstream>
#include <vector>

#include "border.h"

using ta::dup;
using ta::guard;

namespace {

using torch::jit::Module;

// The submodule at a dotted path ("" is the module itself).
Module submodule(const Module& root, const std::string& path) {
  Module m = root;
  std::stringstream ss(path);
  std::string part;
  while (!path.empty() && std::getline(ss, part, '.')) {
    TORCH_CHECK(m.hasattr(part), "no submodule ", part, " in ", path);
    auto v = m.attr(part);
    TORCH_CHECK(v.isModule(), path, ": ", part, " is not a module");
    m = v.toModule();
  }
  return m;
}

// Every node of a graph, nested blocks included.
void each_node(torch::jit::Block* b, const std::function<void(torch::jit::Node*)>& f) {
  for (auto* n : b->nodes()) {
    f(n);
    for (auto* sub : n->blocks()) each_node(sub, f);
  }
}

// An int list argument of a graph node: a constant, or a list built from constants.
std::vector<int64_t> int_list(torch::jit::Value* v) {
  if (auto iv = torch::jit::toIValue(v)) {
    if (iv->isIntList()) return iv->toIntVector();
    if (iv->isInt()) return {iv->toInt()};
  }
  auto* n = v->node();
  TORCH_CHECK(n->kind() == c10::prim::ListConstruct, "a convolution argument is not a constant");
  std::vector<int64_t> out;
  for (auto* in : n->inputs()) {
    auto iv = torch::jit::toIValue(in);
    TORCH_CHECK(iv && iv->isInt(), "a convolution argument is not a constant");
    out.push_back(iv->toInt());
  }
  return out;
}

int64_t pair_value(const std::vector<int64_t>& v, const char* what) {
  TORCH_CHECK(!v.empty() && (v.size() == 1 || v[0] == v[1]),
              "a convolution with different ", what, " per dimension is not supported");
  return v[0];
}

}  // namespace

extern "C" {

// A text description of `m`: one line per submodule, `M\t<path>\t<type>`; per method graph of
// each, `O\t<path>\t<op>\t<count>` for linear and convolution ops, and `C\t<path>\t<child>\t<count>`
// for calls into child modules.
char* ta_module_describe(const Module* m, char** out) {
  return guard([&] {
    std::ostringstream os;
    for (const auto& item : m->named_modules()) {
      const std::string& path = item.name;
      const Module& sub = item.value;
      os << "M\t" << path << "\t" << sub.type()->name()->qualifiedName() << "\n";
      std::map<std::string, int64_t> ops, calls;
      for (const auto& method : sub.get_methods()) {
        each_node(method.graph()->block(), [&](torch::jit::Node* n) {
          const std::string kind = n->kind().toQualString();
          if (kind == "aten::linear" || kind == "aten::matmul" || kind.rfind("aten::conv", 0) == 0 ||
              kind == "aten::_convolution") {
            ops[kind] += 1;
          }
          if (n->kind() == c10::prim::CallMethod) {
            auto* obj = n->input(0)->node();
            if (obj->kind() == c10::prim::GetAttr && obj->input(0) == method.graph()->inputs()[0]) {
              calls[obj->s(c10::attr::name)] += 1;
            }
          }
        });
      }
      for (const auto& o : ops) os << "O\t" << path << "\t" << o.first << "\t" << o.second << "\n";
      for (const auto& c : calls) os << "C\t" << path << "\t" << c.first << "\t" << c.second << "\n";
    }
    *out = dup(os.str());
  });
}

// Stride, padding, dilation and groups of the one 2-d convolution in the forward of the
// submodule at `path` (read from its graph, inlined and constant-folded, so that scripted and
// traced convolutions alike give them): out = [stride, padding, dilation, groups].
char* ta_module_conv_geometry(const Module* m, const char* path, int64_t* out) {
  return guard([&] {
    Module sub = submodule(*m, path);
    auto graph = sub.get_method("forward").graph()->copy();
    torch::jit::Inline(*graph);
    torch::jit::ConstantPropagation(graph);
    torch::jit::Node* conv = nullptr;
    int64_t count = 0;
    each_node(graph->block(), [&](torch::jit::Node* n) {
      const std::string kind = n->kind().toQualString();
      if (kind == "aten::conv2d" || kind == "aten::_convolution" || kind == "aten::convolution") {
        conv = n;
        count += 1;
      }
      if (kind == "aten::pad" || kind == "aten::constant_pad_nd" || kind == "aten::reflection_pad2d" ||
          kind == "aten::replicate_pad2d" || kind == "aten::_pad_circular") {
        TORCH_CHECK(false, path, ": padding modes other than zeros are not supported");
      }
    });
    TORCH_CHECK(count == 1, path, ": expected one 2-d convolution in forward, found ", count);
    const std::string kind = conv->kind().toQualString();
    if (kind == "aten::conv2d") {
      auto pad = torch::jit::toIValue(conv->input(4));
      TORCH_CHECK(!(pad && pad->isString()), path, ": padding='", pad ? pad->toStringRef() : "",
                  "' is not supported");
      out[0] = pair_value(int_list(conv->input(3)), "strides");
      out[1] = pair_value(int_list(conv->input(4)), "paddings");
      out[2] = pair_value(int_list(conv->input(5)), "dilations");
      out[3] = torch::jit::toIValue(conv->input(6)).value().toInt();
    } else {
      auto transposed = torch::jit::toIValue(conv->input(6));
      TORCH_CHECK(transposed && !transposed->toBool(), path, ": transposed convolutions are not supported");
      out[0] = pair_value(int_list(conv->input(3)), "strides");
      out[1] = pair_value(int_list(conv->input(4)), "paddings");
      out[2] = pair_value(int_list(conv->input(5)), "dilations");
      out[3] = torch::jit::toIValue(conv->input(8)).value().toInt();
    }
  });
}

// Gives the submodule at `path` a child `name` of the shared quantizer module type
// `__torch__.torchapprox.quantizers.<type_name>`, holding the parameter `alpha`, the buffer
// `observed` (a 0-dim zero) and the flag `calibrating` (false).
char* ta_module_add_quantizer(const Module* m, const char* path, const char* name, const char* type_name,
                              const at::Tensor* alpha) {
  return guard([&] {
    Module sub = submodule(*m, path);
    // Instances of a class share its attributes: only a filled slot means "done before".
    auto slot = sub.type()->findAttributeSlot(name);
    auto obj = sub._ivalue();
    bool filled = slot && *slot < obj->slots().size() && !obj->getSlot(*slot).isNone();
    if (filled) {
      // Ours is a module of the crate's quantizer type; anything else is the user's own.
      auto v = obj->getSlot(*slot);
      bool ours = v.isObject() && v.toObjectRef().type()->name() &&
                  v.toObjectRef().type()->name()->qualifiedName().rfind("__torch__.torchapprox.quantizers.", 0) == 0;
      TORCH_CHECK(!ours, path, " already has ", name, ": it was rewritten before");
      TORCH_CHECK(false, path, " has an attribute ", name, " of its own (", v.tagKind(),
                  "): the rewrite needs that name for the layer's PACT quantizer");
    }
    auto cu = m->type()->compilation_unit();
    c10::QualifiedName qn(std::string("__torch__.torchapprox.quantizers.") + type_name);
    Module q;
    if (auto existing = cu->get_class(qn)) {
      q = Module(cu, existing);
    } else {
      q = Module(qn, cu, false);
    }
    q.register_attribute("training", c10::BoolType::get(), sub.is_training());
    q.register_parameter("alpha", *alpha, false);
    q.register_buffer("observed", at::zeros({}, alpha->options()));
    q.register_attribute("calibrating", c10::BoolType::get(), false);
    sub.register_module(name, q);
  });
}

// Replaces the forward of the submodule at `path` (of its class type, so of every instance of
// that type) by `source`, a TorchScript `def forward(self, ...)`.
char* ta_module_replace_forward(const Module* m, const char* path, const char* source) {
  return guard([&] {
    Module sub = submodule(*m, path);
    auto type = sub.type();
    auto cu = type->compilation_unit();
    if (type->findMethod("forward") != nullptr) {
      type->unsafeRemoveMethod("forward");
      cu->unsafeRemoveMethod(c10::QualifiedName(*type->name(), "forward"));
    }
    sub.define(source);
  });
}

// Sets the bool attribute `name` of the submodule at `path`.
char* ta_module_set_bool(const Module* m, const char* path, const char* name, int value) {
  return guard([&] {
    Module sub = submodule(*m, path);
    TORCH_CHECK(sub.hasattr(name), path, " has no attribute ", name);
    sub.setattr(name, value != 0);
  });
}

// The tensor attribute `name` of the submodule at `path` (a parameter, buffer or other tensor).
char* ta_module_get_tensor(const Module* m, const char* path, const char* name, at::Tensor** out) {
  return guard([&] {
    Module sub = submodule(*m, path);
    TORCH_CHECK(sub.hasattr(name), path, " has no attribute ", name);
    auto v = sub.attr(name);
    TORCH_CHECK(v.isTensor(), path, ".", name, " is not a tensor");
    *out = new at::Tensor(v.toTensor());
  });
}

// Every buffer (tensor attribute that is not a parameter) with its dotted name, in module order.
char* ta_module_named_buffers(const Module* m, void* data, void (*f)(void*, const char*, at::Tensor*)) {
  return guard([&] {
    for (const auto& b : m->named_buffers(true)) f(data, b.name.c_str(), new at::Tensor(b.value));
  });
}

// The module serialized as `torch.jit.save` writes it, into malloc'ed memory (`*out`, `*len`
// bytes; the caller frees it with ta_free): a private copy, with no file anyone could replace.
char* ta_module_save_bytes(const Module* m, char** out, int64_t* len) {
  return guard([&] {
    std::ostringstream os;
    m->save(os);
    const std::string s = os.str();
    char* p = static_cast<char*>(std::malloc(s.size() == 0 ? 1 : s.size()));
    TORCH_CHECK(p != nullptr, "out of memory copying a module of ", s.size(), " bytes");
    std::memcpy(p, s.data(), s.size());
    *out = p;
    *len = static_cast<int64_t>(s.size());
  });
}

}  // extern "C"
