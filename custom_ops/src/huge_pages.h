// Large constant buffers on transparent huge pages, where the OS allows them (Linux, THP "madvise" or "always").
// A decode product streams its repacked weights from DRAM once per call; on 4 KiB pages every 4 KiB of that stream
// is a TLB miss and a restart of the hardware prefetcher's page-bounded stream. (numpy's large arrays, the streaming
// read the kernels are measured against, get huge pages the same way.)
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bmoe {

// Advises huge pages for the 2 MiB-aligned interior of [p, p + bytes): no page outside the buffer is added, so the
// resident size stays the buffer's. Call before the buffer is first written (pages already touched stay small).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p), lo = (b + kHuge - 1) & ~(kHuge - 1),
                  hi = (b + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: a refusal is harmless
#else
  (void)p, (void)bytes;
#endif
}

// std::vector allocator: blocks of 4 MiB and more are fresh anonymous mappings with huge-page advice (malloc may
// hand back memory already touched, on small pages); smaller ones come from malloc.
template <class T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kMapBytes = size_t{4} << 20;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T);
#if defined(__linux__)
    if (bytes >= kMapBytes) {
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      advise_huge_pages(p, bytes);
      return static_cast<T*>(p);
    }
#endif
    void* p = std::malloc(bytes);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
#if defined(__linux__)
    if (n * sizeof(T) >= kMapBytes) {
      munmap(p, n * sizeof(T));
      return;
    }
#endif
    std::free(p);
  }
  template <class U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};

template <class T>
using HugeVector = std::vector<T, HugePageAllocator<T>>;

}  // namespace bmoe
