// Streamed angles (docs/ops.md, "ButterflyRotate, streamed form"): per-expert angle
// slices read on demand from a file into a bounded LRU of cos/sin tables.
//
// One AngleCache per streamed ButterflyRotate node. The file is opened once (at
// kernel creation) and closed with the cache. A miss reads exactly the expert's
// slice with pread and builds its table outside the lock; tables are handed out as
// shared_ptr, so evicting a slot never frees a table that a concurrent Run still
// uses (it lives until its last user drops it). Totals of all caches in the
// process are kept in global counters (BmoeAngleCacheStats / BmoeAngleCacheReset).
//
// Look-ahead prefetch (docs/ops.md, "AnglePrefetch"): nodes with the same non-empty
// cache_key attribute share one AngleCache (AngleCache::shared, a process-wide
// registry of weak references), so an AnglePrefetch node can fill the cache that
// the ButterflyRotate nodes of the next layer read. An entry inserted by a prefetch
// is flagged until its first hit (counted as a prefetch hit).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "model_file.h"

namespace bmoe {

class AngleCache {
 public:
  using Table = std::shared_ptr<const std::vector<float>>;
  // Fills `table` (table_floats(S, P) floats) from one expert's raw slice.
  using Builder = std::function<void(const void* raw, float* table)>;

  // What a streamed node declares. `file` is opened inside `model_dir` (model_file.h);
  // it must have exactly `file_size` bytes and hold at least `experts` slices of the
  // smallest table (one angle each) from `offset`. `elem_bytes`: one stored angle (4, 2 or 1).
  struct Params {
    std::string model_dir, file;
    int64_t offset;
    uint64_t file_size;
    size_t experts, elem_bytes, slots;
  };

  // Opens and checks the file (throws OpError naming it).
  explicit AngleCache(const Params& p);
  ~AngleCache();
  AngleCache(const AngleCache&) = delete;

  // The cache for `key`: with an empty key a new one; otherwise the live cache
  // registered under `key` (created if none). Throws OpError if that cache was
  // opened with other parameters (file, offset, experts, element size, slots).
  static std::shared_ptr<AngleCache> shared(const std::string& key, const Params& p);

  // Throws OpError unless the file holds all `experts` slices of S stages from the offset.
  void check_extent(size_t S) const;
  AngleCache& operator=(const AngleCache&) = delete;

  // The cos/sin table of expert `e` for S stages, built by `build` on a miss. `tag`
  // identifies what else the table depends on (the int8 angle_scale[e] bits): a
  // cached table with another tag is rebuilt. Thread-safe. Throws OpError naming
  // the file and expert on a short read (truncated file) or a read error.
  Table acquire(size_t e, size_t S, uint32_t tag, const Builder& build);

  // acquire in three steps, for a group of experts (deterministic LRU order whatever
  // the threads): lookup each (a hit is counted and made most recent; null on a miss),
  // load the misses (any thread; counted), then insert them in a fixed order. With at
  // most `slots` experts in a group, inserting never evicts one of the group's hits.
  Table lookup(size_t e, size_t S, uint32_t tag);
  // `prefetch`: count the read as a prefetch (not a miss) and flag the inserted entry.
  Table load(size_t e, size_t S, const Builder& build, bool prefetch = false) const;
  Table insert(size_t e, size_t S, uint32_t tag, Table table, bool prefetch = false);

  // For AnglePrefetch: the S the cached tables are built for (0: no lookup yet), and
  // whether expert e is cached with `tag` for S (if so it is made most recent, no hit
  // counted).
  size_t stages();
  bool touch(size_t e, size_t S, uint32_t tag);

  size_t experts() const { return experts_; }
  size_t slots() const { return slots_; }
  const std::string& path() const { return path_; }

 private:
  struct Entry {
    Table table;
    uint32_t tag = 0;
    bool prefetched = false;  // inserted by a prefetch and not hit since
    std::list<size_t>::iterator lru;
  };
  void read_slice(size_t e, size_t bytes, unsigned char* out) const;
  Entry* find(size_t e);  // the cached entry of expert e, or null (mu_ held)

  std::string path_;
  int64_t offset_;
  uint64_t file_size_;
  size_t experts_, elem_bytes_, slots_;
  int fd_ = -1;
  std::mutex mu_;            // guards everything below
  size_t stages_ = 0;        // S the cached tables were built for (0: none yet)
  std::unordered_map<size_t, Entry> entries_;  // cached experts only (at most ~slots_)
  std::list<size_t> lru_;    // cached experts, most recently used first
};

}  // namespace bmoe
