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
// task. ORT hands tasks to its threads dynamically, so a surplus task costs only a failed claim.
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

// Runs first(i0, i1) over guided runs covering [0, n1), then then(i0, i1) over guided runs covering [0, n2)
// (claim_runs), on ORT's intra-op pool with min(max(n1, n2), kMaxParallelTasks) tasks. A task waits (yielding)
// until every first item is done before claiming a `then` run; with n1 = 0 there is no wait. No task waits for an
// item that is not being run (an item is claimed by a running task), so this cannot deadlock. Neither body may
// throw.
template <class First, class Then>
void parallel_claim(const OrtApi* api, OrtKernelContext* ctx, size_t n1, First& first, size_t n2, Then& then) {
  std::atomic<size_t> next1{0}, done1{0}, next2{0};
  auto counted = [&](size_t i0, size_t i1) {
    first(i0, i1);
    done1.fetch_add(i1 - i0, std::memory_order_release);
  };
  auto task = [&](size_t) {
    claim_runs(next1, n1, counted);
    while (done1.load(std::memory_order_acquire) < n1) std::this_thread::yield();
    claim_runs(next2, n2, then);
  };
  const size_t n = n1 > n2 ? n1 : n2, tasks = n < kMaxParallelTasks ? n : kMaxParallelTasks;
  if (tasks <= 1) return task(0);
  auto tramp = [](void* p, size_t i) { (*static_cast<decltype(task)*>(p))(i); };
  check_ort(api, api->KernelContext_ParallelFor(ctx, tramp, tasks, 0, &task));
}

template <class Body>
void parallel_claim(const OrtApi* api, OrtKernelContext* ctx, size_t n, Body& body) {
  auto none = [](size_t, size_t) {};
  parallel_claim(api, ctx, 0, none, n, body);
}

}  // namespace bmoe
