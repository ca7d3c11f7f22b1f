// Thin layer over ORT's C API: errors as exceptions inside the library (converted
// to OrtStatus at the C boundary), tensor access, attributes and ParallelFor.
#pragma once
#include <onnxruntime_c_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace bmoe {

// ORT API level we are built against and request at registration (ORT >= 1.21).
constexpr uint32_t kOrtApiVersion = 21;

// Any validation failure; becomes ORT_INVALID_ARGUMENT (or ORT_FAIL) at the boundary.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws OpError with ORT's message if `st` is an error (and releases it).
void check_ort(const OrtApi* api, OrtStatus* st);

// Runs `fn` and converts any exception into an OrtStatus (nullptr on success).
template <class Fn>
OrtStatus* guarded(const OrtApi* api, const char* op, Fn&& fn) noexcept {
  try {
    fn();
    return nullptr;
  } catch (const OpError& e) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(op) + ": " + e.what()).c_str());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string(op) + ": internal error: " + e.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, (std::string(op) + ": unknown internal error").c_str());
  }
}

struct Tensor {
  bool present = false;  // false for an omitted optional input
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t numel() const;
};

const char* type_name(ONNXTensorElementDataType t);
std::string shape_str(const std::vector<int64_t>& s);

Tensor input(const OrtApi* api, OrtKernelContext* ctx, size_t index);
void* output(const OrtApi* api, OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape);

// Optional int/string attribute; returns `dflt` when absent. An attribute of another
// type (e.g. transpose=1.0, packing=3) is an OpError naming it, never the default.
int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t dflt, bool* found = nullptr);
std::string attr_string(const OrtApi* api, const OrtKernelInfo* info, const char* name, const std::string& dflt,
                        bool* found = nullptr);

// a · b and a + b for sizes, or an OpError saying `what` is too large (no wrap-around).
size_t checked_mul(size_t a, size_t b, const char* what);
size_t checked_add(size_t a, size_t b, const char* what);

// Constant initializer bound to input `index` at kernel creation, or an absent Tensor.
Tensor constant_input(const OrtApi* api, const OrtKernelInfo* info, size_t index);

// Runs task(i) for i in [0, n) on ORT's intra-op pool. `task` must not throw.
template <class Task>
void parallel_for(const OrtApi* api, OrtKernelContext* ctx, size_t n, Task& task) {
  if (n == 1) return task(size_t{0});
  auto tramp = [](void* p, size_t i) { (*static_cast<Task*>(p))(i); };
  check_ort(api, api->KernelContext_ParallelFor(ctx, tramp, n, 0, &task));
}

// More tasks than any device has cores. The custom-op API does not tell the pool's size, and guessing it (e.g. from
// this thread's CPU affinity, which a caller may change between sessions) once left an 8-thread pool running one
// task. A surplus task costs little: ORT runs it on a thread that has already emptied the work (Shares::work).
inline constexpr size_t kMaxParallelTasks = 64;

// Divisor of guided claiming: a claim takes 1/kClaimDivisor of the items left (at least one).
inline constexpr size_t kClaimDivisor = 16;

// Claims guided runs [i0, i1) of [i, n) from `next` and runs body(i0, i1) on each, until none is left: each claim
// takes 1/kClaimDivisor of the items left (at least one), so the first runs are long (few claims; a run is meant to
// be one sequential stream) and the last are single items (the threads finish together, however many there are).
template <class Body>
void claim_runs(std::atomic<size_t>& next, size_t n, Body& body) {
  for (size_t i = next.load(std::memory_order_relaxed); i < n;) {
    const size_t take = (n - i) / kClaimDivisor > 1 ? (n - i) / kClaimDivisor : 1;
    if (!next.compare_exchange_weak(i, i + take, std::memory_order_relaxed)) continue;  // i: reloaded
    body(i, i + take);
    i = next.load(std::memory_order_relaxed);
  }
}

// Items [0, n) in s contiguous shares, one per thread expected, with stealing. A thread takes the share it arrives
// for in runs from its front (a quarter of what is left, at least one item), so its weights are one sequential
// stream: one prefetch ramp a call, and a kernel prefetching past a run's end fetches the next run's start. A thread
// without a share, or done with its own, steals the back half of the largest share left, so a late or slow thread's
// share is shared out, down to single items at the end. s comes from the threads an earlier call saw (the custom-op
// API does not tell the pool's size); too few shares only means more stealing. body(i0, i1, fresh): `fresh` unless
// the run continues this thread's previous one (its start is not yet being prefetched).
class Shares {
 public:
  // n < 2^32 (a share is two 32-bit bounds in one atomic word).
  Shares(size_t n, size_t s) : s_(s < 1 ? 1 : s > kMaxParallelTasks ? kMaxParallelTasks : s), id_(next_id()) {
    for (size_t i = 0; i < s_; ++i) share_[i].r.store(pack(i * n / s_, (i + 1) * n / s_), std::memory_order_relaxed);
  }

  template <class Body>
  void work(Body& body) {
    // ORT runs a thread's tasks one after another, and a task returns only when no item is left: this thread's
    // later tasks of the call have nothing to do (and need not touch the shared counters).
    thread_local uint64_t joined = 0;
    if (joined == id_) return;
    joined = id_;
    seen_.fetch_add(1, std::memory_order_relaxed);
    const size_t a = arrivals_.fetch_add(1, std::memory_order_relaxed);
    size_t i0, i1;
    for (bool fresh = true; a < s_ && take(a, true, i0, i1); fresh = false) body(i0, i1, fresh);
    for (size_t v = largest(); v < s_; v = largest())
      if (take(v, false, i0, i1)) body(i0, i1, true);
  }
  size_t threads_seen() const { return seen_.load(std::memory_order_relaxed); }

 private:
  static uint64_t next_id() {  // 1, 2, ...: an id per call, never reused (an address could be)
    static std::atomic<uint64_t> ids{0};
    return ids.fetch_add(1, std::memory_order_relaxed) + 1;
  }
  static uint64_t pack(size_t front, size_t back) { return uint64_t(front) << 32 | uint64_t(back); }
  // A run from the front of share v (its owner) or the back half (a thief); false when the share is empty.
  bool take(size_t v, bool front, size_t& i0, size_t& i1) {
    uint64_t r = share_[v].r.load(std::memory_order_relaxed);
    for (;;) {
      const size_t f = r >> 32, b = r & 0xFFFFFFFFu;
      if (f >= b) return false;
      const size_t rest = b - f, n = front ? (rest / 4 > 1 ? rest / 4 : 1) : (rest / 2 > 1 ? rest / 2 : 1);
      const uint64_t to = front ? pack(f + n, b) : pack(f, b - n);
      if (share_[v].r.compare_exchange_weak(r, to, std::memory_order_relaxed)) {
        i0 = front ? f : b - n, i1 = i0 + n;
        return true;
      }
    }
  }
  size_t largest() const {  // the share with the most items left; s_ when none is left
    size_t best = s_, most = 0;
    for (size_t i = 0; i < s_; ++i) {
      const uint64_t r = share_[i].r.load(std::memory_order_relaxed);
      const size_t f = r >> 32, b = r & 0xFFFFFFFFu;
      if (b > f && b - f > most) best = i, most = b - f;
    }
    return best;
  }
  struct alignas(64) Share {  // a line each: an owner's claims do not bounce its neighbours' lines
    std::atomic<uint64_t> r;
  };
  Share share_[kMaxParallelTasks];
  size_t s_;
  uint64_t id_;
  alignas(64) std::atomic<size_t> arrivals_{0}, seen_{0};  // not on the line of s_ and id_, read by every task
};

// Runs first(i0, i1) over guided runs covering [0, n1) (claim_runs), then then(i0, i1, fresh) over runs covering
// [0, n2) taken from contiguous shares (Shares; as many as `threads`, which is raised to the threads this call
// saw), on ORT's intra-op pool with min(max(n1, n2), kMaxParallelTasks) tasks. A task waits (yielding) until every
// first item is done before taking a `then` run; with n1 = 0 there is no wait. No task waits for an item that is not
// being run (an item is claimed by a running task), so this cannot deadlock. Neither body may throw.
template <class First, class Then>
void parallel_claim(const OrtApi* api, OrtKernelContext* ctx, std::atomic<size_t>& threads, size_t n1, First& first,
                    size_t n2, Then& then) {
  if (n2 >> 32) throw OpError("too many work items for one call");
  std::atomic<size_t> next1{0}, done1{0};
  Shares shares(n2, threads.load(std::memory_order_relaxed));
  auto counted = [&](size_t i0, size_t i1) {
    first(i0, i1);
    done1.fetch_add(i1 - i0, std::memory_order_release);
  };
  auto task = [&](size_t) {
    claim_runs(next1, n1, counted);
    while (done1.load(std::memory_order_acquire) < n1) std::this_thread::yield();
    shares.work(then);
  };
  const size_t n = n1 > n2 ? n1 : n2, tasks = n < kMaxParallelTasks ? n : kMaxParallelTasks;
  if (tasks <= 1) return task(0);
  auto tramp = [](void* p, size_t i) { (*static_cast<decltype(task)*>(p))(i); };
  check_ort(api, api->KernelContext_ParallelFor(ctx, tramp, tasks, 0, &task));
  for (size_t seen = shares.threads_seen(), t = threads.load(std::memory_order_relaxed); seen > t;)
    if (threads.compare_exchange_weak(t, seen, std::memory_order_relaxed)) break;
}

template <class Body>
void parallel_claim(const OrtApi* api, OrtKernelContext* ctx, std::atomic<size_t>& threads, size_t n, Body& body) {
  auto none = [](size_t, size_t) {};
  parallel_claim(api, ctx, threads, 0, none, n, body);
}

}  // namespace bmoe
