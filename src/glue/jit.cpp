// TorchScript module surgery (`ta_module_*`): read submodules, graphs and tensors, add
// quantizer submodules, replace a class's forward, and serialize a module to memory.
#include <ATen/ATen.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>
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

// A constant value as text for Rust to parse: `i:3`, `f:0.5`, `l:1,2` (ints), `b:1`, `s:same`, `n`
// (None), `t` (a tensor) or `?` (anything else).
std::string render_ivalue(const c10::IValue& iv) {
  if (iv.isNone()) return "n";
  if (iv.isBool()) return iv.toBool() ? "b:1" : "b:0";
  if (iv.isInt()) return "i:" + std::to_string(iv.toInt());
  if (iv.isDouble()) {
    std::ostringstream os;
    os.precision(17);
    os << iv.toDouble();
    return "f:" + os.str();
  }
  if (iv.isString()) return "s:" + iv.toStringRef();
  if (iv.isIntList()) {
    std::string out = "l:";
    auto xs = iv.toIntVector();
    for (size_t i = 0; i < xs.size(); ++i) out += (i ? "," : "") + std::to_string(xs[i]);
    return out;
  }
  if (iv.isTensor()) return "t";
  return "?";
}

// A graph value as `render_ivalue` writes it, or `?` when it is not known before running.
// Constants, lists built from constants, and attributes of the module itself (`self.x`, such
// as Conv2d's `_reversed_padding_repeated_twice` in scripted code) count as known.
std::string render(torch::jit::Value* v, const Module& self, torch::jit::Value* self_value) {
  if (auto iv = torch::jit::toIValue(v)) return render_ivalue(*iv);
  auto* n = v->node();
  if (n->kind() == c10::prim::GetAttr && n->input(0) == self_value) {
    const std::string name = n->s(c10::attr::name);
    if (!self.hasattr(name)) return "?";
    auto iv = self.attr(name);
    return iv.isModule() ? "?" : render_ivalue(iv);
  }
  if (n->kind() != c10::prim::ListConstruct) return "?";
  std::string out = "l:";
  bool first = true;
  for (auto* in : n->inputs()) {
    auto iv = torch::jit::toIValue(in);
    if (!iv || !iv->isInt()) return "?";
    out += (first ? "" : ",") + std::to_string(iv->toInt());
    first = false;
  }
  return out;
}

// TorchScript's own names, plus `torchapprox.<op>` for the crate's operators (ops.cpp).
struct CrateResolver : public torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name, torch::jit::GraphFunction& m,
                                                         const torch::jit::SourceRange& loc) override {
    if (name == "torchapprox") return std::make_shared<torch::jit::BuiltinModule>("torchapprox");
    return torch::jit::nativeResolver()->resolveValue(name, m, loc);
  }
  c10::TypePtr resolveType(const std::string& name, const torch::jit::SourceRange& loc) override {
    return torch::jit::nativeResolver()->resolveType(name, loc);
  }
};

}  // namespace

extern "C" {

// A text description of `m`: one line per submodule, `M\t<path>\t<type>`; per method graph of
// each, `O\t<path>\t<op>\t<count>` for every `aten::` op, and `C\t<path>\t<child>\t<count>`
// for calls into child modules. Which ops matter is Rust's decision.
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
          if (kind.rfind("aten::", 0) == 0) ops[kind] += 1;
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

// Every `aten::` node of the forward of the submodule at `path`, inlined and constant-folded
// (so scripted and traced modules alike show their constants), one per line:
// `<op>\t<arg>\t<arg>...` with each argument as `render` writes it (the module's own attributes
// read from `sub`). Rust decides what they mean.
char* ta_module_forward_ops(const Module* m, const char* path, char** out) {
  return guard([&] {
    Module sub = submodule(*m, path);
    auto graph = sub.get_method("forward").graph()->copy();
    torch::jit::Inline(*graph);
    torch::jit::ConstantPropagation(graph);
    std::ostringstream os;
    each_node(graph->block(), [&](torch::jit::Node* n) {
      const std::string kind = n->kind().toQualString();
      if (kind.rfind("aten::", 0) != 0) return;
      os << kind;
      for (auto* in : n->inputs()) os << "\t" << render(in, sub, graph->inputs()[0]);
      os << "\n";
    });
    *out = dup(os.str());
  });
}

// Gives the submodule at `path` a child `name` of the shared quantizer module type
// `__torch__.torchapprox.quantizers.<type_name>`, holding `state` as the parameter (or, when
// `is_parameter` is 0, the buffer) `state_name`, the buffer `observed` (a 0-dim zero) and the
// flag `calibrating` (false).
char* ta_module_add_quantizer(const Module* m, const char* path, const char* name, const char* type_name,
                              const char* state_name, const at::Tensor* state, int is_parameter) {
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
    if (is_parameter != 0) {
      q.register_parameter(state_name, *state, false);
    } else {
      q.register_buffer(state_name, *state);
    }
    q.register_buffer("observed", at::zeros({}, state->options()));
    q.register_attribute("calibrating", c10::BoolType::get(), false);
    sub.register_module(name, q);
  });
}

// Replaces the methods `methods` (newline-separated names, `forward` among them) of the
// submodule at `path` (of its class type, so of every instance of that type) by `source`,
// TorchScript `def`s, which may call the crate's operators as `torchapprox.<op>(...)`.
char* ta_module_replace_forward(const Module* m, const char* path, const char* source, const char* methods) {
  return guard([&] {
    Module sub = submodule(*m, path);
    auto type = sub.type();
    auto cu = type->compilation_unit();
    std::stringstream names(methods);
    std::string name;
    while (std::getline(names, name)) {
      if (type->findMethod(name) != nullptr) {
        type->unsafeRemoveMethod(name);
        cu->unsafeRemoveMethod(c10::QualifiedName(*type->name(), name));
      }
    }
    sub.define(source, std::make_shared<CrateResolver>());
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

// Sets the plain attribute `name` (neither parameter nor buffer) of the submodule at `path` to
// `tensor` (when `tensor` is not null) or to the int `value`, declaring it on first use.
char* ta_module_set_attr(const Module* m, const char* path, const char* name, const at::Tensor* tensor,
                         int64_t value) {
  return guard([&] {
    Module sub = submodule(*m, path);
    c10::IValue v = tensor != nullptr ? c10::IValue(*tensor) : c10::IValue(value);
    if (sub.type()->hasAttribute(name)) {
      sub._ivalue()->setAttr(name, v);
    } else {
      auto type = tensor != nullptr ? c10::TypePtr(c10::TensorType::get()) : c10::TypePtr(c10::IntType::get());
      sub.register_attribute(name, type, v, false, false);
    }
  });
}

// The schema of the forward of the submodule at `path`, and its attributes or constants
// `names` (one per line, `\n`-separated) as `render_ivalue` writes them, `?` where absent:
// one text for Rust.
char* ta_module_inspect(const Module* m, const char* path, const char* names, char** out) {
  return guard([&] {
    Module sub = submodule(*m, path);
    std::ostringstream os;
    os << sub.get_method("forward").function().getSchema() << "\n";
    std::stringstream ss(names);
    std::string name;
    while (std::getline(ss, name)) {
      // Scripted modules keep `__constants__` (MultiheadAttention's batch_first) on the type.
      std::string value = "?";
      if (sub.hasattr(name)) {
        value = render_ivalue(sub.attr(name));
      } else if (sub.type()->hasConstant(name)) {
        value = render_ivalue(sub.type()->getConstant(name));
      }
      os << name << "\t" << value << "\n";
    }
    *out = dup(os.str());
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

// Runs the forward of the submodule at `path` on the tensors `inputs` and hands each tensor
// of its output (one tensor, or a tuple's items in order; null for a None item) to `f`.
char* ta_module_call_forward(const Module* m, const char* path, const at::Tensor* const* inputs, int n, void* data,
                             void (*f)(void*, at::Tensor*)) {
  return guard([&] {
    Module sub = submodule(*m, path);
    std::vector<c10::IValue> args;
    for (int i = 0; i < n; ++i) args.emplace_back(*inputs[i]);
    auto out = sub.get_method("forward")(args);
    std::vector<c10::IValue> items;
    if (out.isTuple()) {
      for (const auto& v : out.toTupleRef().elements()) items.push_back(v);
    } else {
      items.push_back(out);
    }
    for (const auto& v : items) {
      TORCH_CHECK(v.isTensor() || v.isNone(), path, "'s forward returned a ", v.tagKind(), ", not tensors");
    }
    for (const auto& v : items) f(data, v.isTensor() ? new at::Tensor(v.toTensor()) : nullptr);
  });
}

// A copy of the module with fresh classes and methods (so a rewrite of the copy never
// reaches the original, and no method of the copy has run or been optimized yet), sharing
// the original's tensors: `*out` is a `new Module`, freed by tch's CModule.
char* ta_module_clone(const Module* m, Module** out) {
  return guard([&] { *out = new Module(m->clone(/*inplace=*/true)); });
}

}  // extern "C"
