// libtorch's intra-op thread pool for Rust kernels (`ta_parallel_for`).
#include <ATen/Parallel.h>

#include "border.h"

using ta::guard;

extern "C" {

// Runs `body(data, begin, end)` over [0, n) on libtorch's intra-op threads, in chunks of at
// least `grain` elements; `body` must not panic (it reports through `data`).
char* ta_parallel_for(int64_t n, int64_t grain, void (*body)(void*, int64_t, int64_t), void* data) {
  return guard([&] { at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { body(data, b, e); }); });
}

}  // extern "C"
