// The border every glue function keeps: errors cross it as malloc'ed strings, never as C++
// exceptions. Conventions: tensors and modules are tch's pointers (`at::Tensor*`,
// `torch::jit::Module*`); every `ta_*` function returns NULL on success or a malloc'ed error
// message that the caller frees with `ta_free`.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ta {

inline char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) {
    std::memcpy(p, s.c_str(), s.size() + 1);
  }
  return p;
}

// Runs `f`, turning any exception into an error string for the caller.
template <typename F>
inline char* guard(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup(e.what());
  } catch (...) {
    return dup("unknown C++ exception");
  }
}

// Throws the message a Rust callback returned, freeing it.
inline void rethrow(char* err) {
  if (err != nullptr) {
    std::string msg(err);
    std::free(err);
    throw std::runtime_error(msg);
  }
}

}  // namespace ta
