// PyTorch's c10d for the crate (`ta_pg_*`): a TCPStore rendezvous and a Gloo process group
// (plus an NCCL one for CUDA tensors where the crate's `nccl` feature built it), and their
// collectives, each waited for within the group's timeout. Which rank hosts the store, the
// prefix, the timeout and the backends are Rust's decisions.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include <algorithm>
#include <chrono>
#include <memory>

#include "border.h"

using ta::guard;

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
  // The Gloo backend as a c10d ProcessGroup (the type the Reducer takes), as Python's
  // init_process_group wraps it.
  c10::intrusive_ptr<c10d::ProcessGroup> wrapped;
  // NCCL for CUDA tensors, or null (Gloo then serves them through host copies).
  c10::intrusive_ptr<c10d::Backend> nccl;

  // The backend of a collective on `t`: NCCL for a CUDA tensor where the group has it.
  c10d::Backend& backend_for(const at::Tensor& t) const {
    if (t.is_cuda() && nccl) return *nccl;
    return *pg;
  }
};

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  work->wait(timeout);
}

}  // namespace

extern "C" {

// Connects to (or, with `is_server`, hosts) the TCPStore at host:port, keys under `prefix`,
// and creates the Gloo group of `world` ranks whose transport binds to `bind_host`; with
// `nccl`, an NCCL group for CUDA tensors beside it, on the GPU `nccl_device` (made this
// thread's current device, as PyTorch requires of an NCCL rank).
char* ta_pg_new(const char* host, int port, int rank, int world, int is_server, int64_t timeout_ms,
                const char* prefix, const char* bind_host, int nccl, int nccl_device, Group** out) {
  return guard([&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    if (is_server != 0) opts.numWorkers = static_cast<std::size_t>(world);
    // The group waits for every rank through the store within the timeout; the store itself
    // need not count clients.
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind_host));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    auto wrapped = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
    wrapped->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    wrapped->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, pg);
    c10::intrusive_ptr<c10d::Backend> nccl_pg;
    if (nccl != 0) {
#ifdef USE_C10D_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(nccl_device));
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      // NCCL exchanges its unique id through keys of its own, as Python's groups of two
      // backends do.
      auto nccl_store = c10::make_intrusive<c10d::PrefixStore>("nccl", store);
      nccl_pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(nccl_store, rank, world, o);
      wrapped->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl_pg);
#else
      throw std::runtime_error("NCCL is not in this build (the crate's `nccl` feature)");
#endif
    } else {
      // Gloo serves CUDA tensors too (through host copies), as Python's "gloo" group does.
      wrapped->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, pg);
    }
    *out = new Group{store, pg, timeout, wrapped, nccl_pg};
  });
}

// Reduces `t` in place over all ranks: op 0 sum, 1 max, 2 min.
char* ta_pg_allreduce(Group* g, at::Tensor* t, int op) {
  return guard([&] {
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX : op == 2 ? c10d::ReduceOp::MIN : c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    std::vector<at::Tensor> v{*t};
    wait(g->backend_for(*t).allreduce(v, o), g->timeout);
  });
}

// Copies rank `root`'s `t` into every rank's `t`.
char* ta_pg_broadcast(Group* g, at::Tensor* t, int64_t root) {
  return guard([&] {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    std::vector<at::Tensor> v{*t};
    wait(g->backend_for(*t).broadcast(v, o), g->timeout);
  });
}

// Returns once every rank called it (or the timeout passed).
char* ta_pg_barrier(Group* g) {
  return guard([&] {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g->pg->barrier(o), g->timeout);
  });
}

// NCCL's communicators are shut down first, as Python's destroy_process_group does (else its
// destructor warns, or waits on a peer that is gone).
void ta_pg_free(Group* g) {
  if (g->nccl) {
    try {
      g->nccl->shutdown();
    } catch (...) {
      // Freeing must not throw; a failed shutdown leaves the communicators to the process's exit.
    }
  }
  delete g;
}

// c10d's Reducer, the engine of PyTorch's DistributedDataParallel, over `n` variables of one
// group: autograd hooks that, as the backward pass makes each gradient, average flattened
// buckets of about `bucket_bytes` over the ranks while the pass goes on (1 MiB for the first
// bucket, as DDP). The variables' order and the bucket size are Rust's decisions.
struct Reducer {
  std::unique_ptr<c10d::Reducer> reducer;
};

char* ta_reducer_new(Group* g, at::Tensor* const* vars, int n, int64_t bucket_bytes, int find_unused, Reducer** out) {
  return guard([&] {
    std::vector<at::Tensor> params;
    for (int i = 0; i < n; ++i) params.push_back(*vars[i]);
    std::vector<bool> sparse(params.size(), false);
    auto cap = static_cast<size_t>(bucket_bytes);
    auto first = std::min(cap, static_cast<size_t>(c10d::kDefaultFirstBucketBytes));
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(params, {first, cap}, sparse);
    // As DDP: gradients come roughly in reverse order of the variables.
    std::reverse(buckets.begin(), buckets.end());
    std::vector<int64_t> caps(limits.rbegin(), limits.rend());
    auto r = std::make_unique<c10d::Reducer>(params, buckets, g->wrapped, sparse, bucket_bytes, find_unused != 0,
                                             /*gradient_as_bucket_view=*/false,
                                             std::unordered_map<size_t, std::string>{},
                                             static_cast<int64_t>(first), /*skip_all_reduce_unused_params=*/false,
                                             /*use_python_reducer=*/false, caps);
    *out = new Reducer{std::move(r)};
  });
}

// Passes warnings on to the handler before it, but for the reducer's advice to stop searching
// for unused variables: the search is the crate's choice (a variable that one pass never
// reaches must count as zeros, not stall its bucket).
struct QuietSearch : c10::WarningHandler {
  c10::WarningHandler* next = c10::WarningUtils::get_warning_handler();
  void process(const c10::Warning& w) override {
    if (w.msg().find("find_unused_parameters=True was specified") == std::string::npos) next->process(w);
  }
};

// Arms the hooks for the next backward pass, whose roots are `outputs` (searched for the
// variables no gradient will reach).
char* ta_reducer_prepare(Reducer* r, at::Tensor* const* outputs, int n) {
  return guard([&] {
    std::vector<at::Tensor> roots;
    for (int i = 0; i < n; ++i) roots.push_back(*outputs[i]);
    QuietSearch quiet;
    c10::WarningUtils::WarningHandlerGuard scope(&quiet);
    r->reducer->prepare_for_backward(roots);
  });
}

// The reducer's destructor removes its hooks and may throw: it runs here, inside the guard,
// not inside a unique_ptr's noexcept destructor.
char* ta_reducer_free(Reducer* r) {
  return guard([&] {
    c10d::Reducer* inner = r->reducer.release();
    delete r;
    delete inner;
  });
}

// A client of the TCPStore at host:port with keys under `prefix`, separate from any group's,
// so that a heartbeat thread can use it while collectives run.
struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

char* ta_store_connect(const char* host, int port, const char* prefix, int64_t timeout_ms, Store** out) {
  return guard([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = false;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new Store{c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp)};
  });
}

// Adds `delta` to the counter `key` (created at 0) and returns its new value in `*out`; a
// delta of 0 reads it without waiting for the key to exist.
char* ta_store_add(Store* s, const char* key, int64_t delta, int64_t* out) {
  return guard([&] { *out = s->store->add(std::string(key), delta); });
}

void ta_store_free(Store* s) { delete s; }

}  // extern "C"
