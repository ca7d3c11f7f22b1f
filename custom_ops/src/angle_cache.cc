#include "angle_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <map>
#include <system_error>

#include "butterfly.h"
#include "ort_glue.h"

#define BMOE_EXPORT extern "C" __attribute__((visibility("default")))

namespace bmoe {
namespace {
std::atomic<uint64_t> g_hits{0}, g_misses{0}, g_bytes_read{0}, g_prefetches{0}, g_prefetch_hits{0};

struct Params {
  std::string path;
  int64_t offset;
  size_t experts, elem_bytes, slots;
  bool operator==(const Params& o) const {
    return path == o.path && offset == o.offset && experts == o.experts && elem_bytes == o.elem_bytes &&
           slots == o.slots;
  }
};
std::mutex g_registry_mu;
std::map<std::string, std::pair<Params, std::weak_ptr<AngleCache>>> g_registry;

std::string err_text(int err) { return std::error_code(err, std::generic_category()).message(); }
}  // namespace

AngleCache::AngleCache(std::string path, int64_t offset, size_t experts, size_t elem_bytes, size_t slots)
    : path_(std::move(path)), offset_(offset), experts_(experts), elem_bytes_(elem_bytes), slots_(slots),
      entries_(experts) {
  do {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd_ < 0 && errno == EINTR);
  if (fd_ < 0) throw OpError("cannot open angle_file '" + path_ + "': " + err_text(errno));
}

std::shared_ptr<AngleCache> AngleCache::shared(const std::string& key, const std::string& path, int64_t offset,
                                               size_t experts, size_t elem_bytes, size_t slots) {
  if (key.empty()) return std::make_shared<AngleCache>(path, offset, experts, elem_bytes, slots);
  const Params want{path, offset, experts, elem_bytes, slots};
  std::lock_guard<std::mutex> lock(g_registry_mu);
  for (auto it = g_registry.begin(); it != g_registry.end();)  // forget caches no node uses any more
    it = it->second.second.expired() ? g_registry.erase(it) : std::next(it);
  auto it = g_registry.find(key);
  if (it != g_registry.end()) {
    if (!(it->second.first == want))
      throw OpError("cache_key '" + key + "' is already used by a node with other angle_file, angle_offset, "
                    "angle_experts, angle_dtype or cache_slots");
    return it->second.second.lock();
  }
  auto cache = std::make_shared<AngleCache>(path, offset, experts, elem_bytes, slots);
  g_registry[key] = {want, cache};
  return cache;
}

AngleCache::~AngleCache() {
  if (fd_ >= 0) ::close(fd_);
}

void AngleCache::read_slice(size_t e, size_t bytes, unsigned char* out) const {
  // offset_ + (e + 1) · bytes must fit in off_t.
  const uint64_t max_off = static_cast<uint64_t>(std::numeric_limits<off_t>::max());
  if (bytes && (e + 1) > (max_off - static_cast<uint64_t>(offset_)) / bytes)
    throw OpError("angle_file '" + path_ + "': expert " + std::to_string(e) + " lies past the largest file offset");
  const off_t start = static_cast<off_t>(offset_ + e * bytes);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t r = ::pread(fd_, out + done, bytes - done, start + static_cast<off_t>(done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw OpError("cannot read angle_file '" + path_ + "' for expert " + std::to_string(e) + ": " + err_text(errno));
    }
    if (r == 0)
      throw OpError("angle_file '" + path_ + "' is truncated: expert " + std::to_string(e) + " needs bytes [" +
                    std::to_string(start) + ", " + std::to_string(start + static_cast<off_t>(bytes)) +
                    "), the file ends at " + std::to_string(start + static_cast<off_t>(done)));
    done += static_cast<size_t>(r);
  }
}

AngleCache::Table AngleCache::lookup(size_t e, size_t S, uint32_t tag) {
  std::lock_guard<std::mutex> lock(mu_);
  if (S != stages_) {  // another D: the file holds other tables; start over
    for (size_t x : lru_) entries_[x].table.reset(), entries_[x].prefetched = false;
    lru_.clear();
    stages_ = S;
  }
  Entry& en = entries_[e];
  if (!en.table || en.tag != tag) return nullptr;
  lru_.splice(lru_.begin(), lru_, en.lru);
  g_hits.fetch_add(1, std::memory_order_relaxed);
  if (en.prefetched) {
    en.prefetched = false;
    g_prefetch_hits.fetch_add(1, std::memory_order_relaxed);
  }
  return en.table;
}

size_t AngleCache::stages() {
  std::lock_guard<std::mutex> lock(mu_);
  return stages_;
}

bool AngleCache::touch(size_t e, size_t S, uint32_t tag) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& en = entries_[e];
  if (S != stages_ || !en.table || en.tag != tag) return false;
  lru_.splice(lru_.begin(), lru_, en.lru);
  return true;
}

AngleCache::Table AngleCache::load(size_t e, size_t S, const Builder& build, bool prefetch) const {
  const size_t P = size_t{1} << S, bytes = S * (P / 2) * elem_bytes_;
  std::vector<unsigned char> raw(bytes);
  read_slice(e, bytes, raw.data());
  auto table = std::make_shared<std::vector<float>>(butterfly::table_floats(S, P));
  build(raw.data(), table->data());
  (prefetch ? g_prefetches : g_misses).fetch_add(1, std::memory_order_relaxed);
  g_bytes_read.fetch_add(bytes, std::memory_order_relaxed);
  return table;
}

AngleCache::Table AngleCache::insert(size_t e, size_t S, uint32_t tag, Table table, bool prefetch) {
  std::lock_guard<std::mutex> lock(mu_);
  if (S != stages_) return table;  // the cache moved to another D meanwhile: use, don't keep
  Entry& en = entries_[e];
  if (en.table) {  // another thread cached it meanwhile (or an old tag): keep the newest
    lru_.splice(lru_.begin(), lru_, en.lru);
    en.prefetched = prefetch && en.prefetched;  // a rotate's insert means the entry is used
  } else {
    if (lru_.size() >= slots_) {  // evict the least recently used; users keep their shared_ptr
      entries_[lru_.back()].table.reset();
      entries_[lru_.back()].prefetched = false;
      lru_.pop_back();
    }
    lru_.push_front(e);
    en.lru = lru_.begin();
    en.prefetched = prefetch;
  }
  en.table = table;
  en.tag = tag;
  return table;
}

AngleCache::Table AngleCache::acquire(size_t e, size_t S, uint32_t tag, const Builder& build) {
  if (Table t = lookup(e, S, tag)) return t;
  return insert(e, S, tag, load(e, S, build));  // read and built outside the lock
}

}  // namespace bmoe

// Totals over every streamed ButterflyRotate in the process (any session).
// hits/misses count (call, expert) table look-ups; bytes_read the angle bytes read.
BMOE_EXPORT void BmoeAngleCacheStats(uint64_t* hits, uint64_t* misses, uint64_t* bytes_read) {
  if (hits) *hits = bmoe::g_hits.load();
  if (misses) *misses = bmoe::g_misses.load();
  if (bytes_read) *bytes_read = bmoe::g_bytes_read.load();
}

// Look-ahead prefetch (AnglePrefetch): experts read by prefetches (their bytes are in
// bytes_read, not in misses), and hits on entries a prefetch brought in, first hit only.
BMOE_EXPORT void BmoeAnglePrefetchStats(uint64_t* prefetches, uint64_t* prefetch_hits) {
  if (prefetches) *prefetches = bmoe::g_prefetches.load();
  if (prefetch_hits) *prefetch_hits = bmoe::g_prefetch_hits.load();
}

BMOE_EXPORT void BmoeAngleCacheReset() {
  bmoe::g_prefetches.store(0);
  bmoe::g_prefetch_hits.store(0);
  bmoe::g_hits.store(0);
  bmoe::g_misses.store(0);
  bmoe::g_bytes_read.store(0);
}
