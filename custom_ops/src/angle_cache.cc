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

bool same(const AngleCache::Params& a, const AngleCache::Params& b) {
  return a.model_dir == b.model_dir && a.file == b.file && a.offset == b.offset && a.file_size == b.file_size &&
         a.experts == b.experts && a.elem_bytes == b.elem_bytes && a.slots == b.slots;
}
std::mutex g_registry_mu;
std::map<std::string, std::pair<AngleCache::Params, std::weak_ptr<AngleCache>>> g_registry;

std::string err_text(int err) { return std::error_code(err, std::generic_category()).message(); }
}  // namespace

AngleCache::AngleCache(const Params& p)
    : offset_(p.offset), file_size_(p.file_size), experts_(p.experts), elem_bytes_(p.elem_bytes), slots_(p.slots) {
  ModelFile f = open_model_file(p.model_dir, p.file, "angle_file");
  fd_ = f.fd;  // closed by the destructor, also when a check below throws
  path_ = f.path;
  struct Closer {
    AngleCache* c;
    bool armed = true;
    ~Closer() {
      if (armed) ::close(c->fd_), c->fd_ = -1;
    }
  } closer{this};
  if (f.size != file_size_)
    throw OpError("angle_file '" + path_ + "' has " + std::to_string(f.size) + " bytes, attribute angle_file_size says " +
                  std::to_string(file_size_));
  // Every table has S >= 1 stages of P/2 >= 1 angles: each expert needs at least elem_bytes.
  const uint64_t avail = file_size_ > static_cast<uint64_t>(offset_) ? file_size_ - static_cast<uint64_t>(offset_) : 0;
  if (experts_ > avail / elem_bytes_)
    throw OpError("attribute angle_experts = " + std::to_string(experts_) + " does not fit in angle_file '" + path_ +
                  "' (" + std::to_string(file_size_) + " bytes) from angle_offset = " + std::to_string(offset_));
  closer.armed = false;
}

std::shared_ptr<AngleCache> AngleCache::shared(const std::string& key, const Params& p) {
  if (key.empty()) return std::make_shared<AngleCache>(p);
  std::lock_guard<std::mutex> lock(g_registry_mu);
  for (auto it = g_registry.begin(); it != g_registry.end();)  // forget caches no node uses any more
    it = it->second.second.expired() ? g_registry.erase(it) : std::next(it);
  auto it = g_registry.find(key);
  if (it != g_registry.end()) {
    if (!same(it->second.first, p))
      throw OpError("cache_key '" + key + "' is already used by a node with other angle_file, angle_offset, "
                    "angle_file_size, angle_experts, angle_dtype or cache_slots");
    return it->second.second.lock();
  }
  auto cache = std::make_shared<AngleCache>(p);
  g_registry[key] = {p, cache};
  return cache;
}

void AngleCache::check_extent(size_t S) const {
  const size_t P = size_t{1} << S;
  const uint64_t slice = checked_mul(checked_mul(S, P / 2, "angle slice"), elem_bytes_, "angle slice");
  const uint64_t avail = file_size_ - static_cast<uint64_t>(offset_);  // >= 0: checked at creation
  if (experts_ > avail / slice)
    throw OpError("angle_file '" + path_ + "' (" + std::to_string(file_size_) + " bytes) cannot hold angle_experts = " +
                  std::to_string(experts_) + " slices of " + std::to_string(slice) + " bytes (S = " +
                  std::to_string(S) + ") from angle_offset = " + std::to_string(offset_));
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
    entries_.clear();
    lru_.clear();
    stages_ = S;
  }
  Entry* en = find(e);
  if (!en || en->tag != tag) return nullptr;
  lru_.splice(lru_.begin(), lru_, en->lru);
  g_hits.fetch_add(1, std::memory_order_relaxed);
  if (en->prefetched) {
    en->prefetched = false;
    g_prefetch_hits.fetch_add(1, std::memory_order_relaxed);
  }
  return en->table;
}

size_t AngleCache::stages() {
  std::lock_guard<std::mutex> lock(mu_);
  return stages_;
}

bool AngleCache::touch(size_t e, size_t S, uint32_t tag) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry* en = find(e);
  if (S != stages_ || !en || en->tag != tag) return false;
  lru_.splice(lru_.begin(), lru_, en->lru);
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
  Entry* en = find(e);
  if (en) {  // another thread cached it meanwhile (or an old tag): keep the newest
    lru_.splice(lru_.begin(), lru_, en->lru);
    en->prefetched = prefetch && en->prefetched;  // a rotate's insert means the entry is used
  } else {
    if (lru_.size() >= slots_) {  // evict the least recently used; users keep their shared_ptr
      entries_.erase(lru_.back());
      lru_.pop_back();
    }
    lru_.push_front(e);
    en = &entries_[e];
    en->lru = lru_.begin();
    en->prefetched = prefetch;
  }
  en->table = table;
  en->tag = tag;
  return table;
}

AngleCache::Entry* AngleCache::find(size_t e) {
  auto it = entries_.find(e);
  return it == entries_.end() ? nullptr : &it->second;
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
