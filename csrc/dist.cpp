// A C interface to PyTorch's c10d (TCPStore rendezvous, ProcessGroupGloo, ProcessGroupNCCL) for the
// Rust side (src/distributed.rs). Every function catches C++ exceptions and returns their message in a
// malloc'd string, since an exception must not unwind into Rust.
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef LISA_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#ifdef LISA_NCCL
// Defined in dist_nccl.cpp, compiled only where the CUDA and NCCL headers exist.
c10::intrusive_ptr<c10d::Backend> lisa_make_nccl(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, std::chrono::milliseconds timeout, int device);
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int world;
  std::vector<std::string> peers;
};

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// Runs `f`, turning any exception into an error string; returns 0 on success.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return 1;
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  for (auto& w : works) w->wait();
}

}  // namespace

extern "C" {

// Bit 0: Gloo compiled in; bit 1: NCCL compiled in.
int lisa_dist_backends() {
  int b = 0;
#ifdef LISA_GLOO
  b |= 1;
#endif
#ifdef LISA_NCCL
  b |= 2;
#endif
  return b;
}

void lisa_dist_free(char* s) { std::free(s); }

// Joins the group: rank 0 serves the TCPStore at host:port, every rank connects to it, then the backend
// (0 = Gloo, 1 = NCCL on cuda:`device`) is built over it. Each rank's "host pid" is shared through the
// store so that a failed collective can say which peer is gone.
void* lisa_dist_join(
    int backend, const char* host, int port, int rank, int world, long long timeout_ms, int device, char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    char hostname[256] = {0};
    gethostname(hostname, sizeof(hostname) - 1);
    std::string me = std::string(hostname) + " " + std::to_string(getpid());
    store->set("lisa/peer/" + std::to_string(rank), std::vector<uint8_t>(me.begin(), me.end()));
    std::vector<std::string> peers;
    for (int r = 0; r < world; ++r) {
      auto v = store->get("lisa/peer/" + std::to_string(r));
      peers.emplace_back(v.begin(), v.end());
    }
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
#ifdef LISA_GLOO
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname && *ifname) {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (is_loopback(host)) {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
#else
      throw std::runtime_error("this build has no Gloo backend");
#endif
    } else {
#ifdef LISA_NCCL
      pg = lisa_make_nccl(store, rank, world, timeout, device);
#else
      (void)device;
      throw std::runtime_error("this build has no NCCL backend");
#endif
    }
    out = new Group{store, pg, world, std::move(peers)};
  });
  return out;
}

// "host pid" of `rank` as shared at join, or NULL.
const char* lisa_dist_peer(void* g, int rank) {
  auto* group = static_cast<Group*>(g);
  if (rank < 0 || rank >= static_cast<int>(group->peers.size())) return nullptr;
  return group->peers[rank].c_str();
}

// Sums each tensor over the ranks in place, then divides by the world size when `average`.
int lisa_dist_all_reduce(void* g, at::Tensor** tensors, int n, int average, char** err) {
  auto* group = static_cast<Group*>(g);
  return guarded(err, [&] {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<std::vector<at::Tensor>> args(n);
    for (int i = 0; i < n; ++i) {
      args[i] = {*tensors[i]};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      works.push_back(group->backend->allreduce(args[i], o));
    }
    wait_all(works);
    if (average) {
      for (int i = 0; i < n; ++i) tensors[i]->div_(group->world);
    }
  });
}

// Overwrites each tensor with `root`'s.
int lisa_dist_broadcast(void* g, at::Tensor** tensors, int n, int root, char** err) {
  auto* group = static_cast<Group*>(g);
  return guarded(err, [&] {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<std::vector<at::Tensor>> args(n);
    for (int i = 0; i < n; ++i) {
      args[i] = {*tensors[i]};
      c10d::BroadcastOptions o;
      o.rootRank = root;
      works.push_back(group->backend->broadcast(args[i], o));
    }
    wait_all(works);
  });
}

int lisa_dist_barrier(void* g, char** err) {
  auto* group = static_cast<Group*>(g);
  return guarded(err, [&] {
    auto w = group->backend->barrier(c10d::BarrierOptions());
    w->wait();
  });
}

void lisa_dist_destroy(void* g) {
  auto* group = static_cast<Group*>(g);
  char* err = nullptr;
  guarded(&err, [&] { group->backend->shutdown(); });
  std::free(err);
  delete group;
}

}  // extern "C"
