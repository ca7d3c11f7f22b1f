#include "angle_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <system_error>

#include "butterfly.h"
#include "ort_glue.h"

#define BMOE_EXPORT extern "C" __attribute__((visibility("default")))

namespace bmoe {
namespace {
std::atomic<uint64_t> g_hits{0}, g_misses{0}, g_bytes_read{0};

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
    for (size_t x : lru_) entries_[x].table.reset();
    lru_.clear();
    stages_ = S;
  }
  Entry& en = entries_[e];
  if (!en.table || en.tag != tag) return nullptr;
  lru_.splice(lru_.begin(), lru_, en.lru);
  g_hits.fetch_add(1, std::memory_order_relaxed);
  return en.table;
}

AngleCache::Table AngleCache::load(size_t e, size_t S, const Builder& build) const {
  const size_t P = size_t{1} << S, bytes = S * (P / 2) * elem_bytes_;
  std::vector<unsigned char> raw(bytes);
  read_slice(e, bytes, raw.data());
  auto table = std::make_shared<std::vector<float>>(butterfly::table_floats(S, P));
  build(raw.data(), table->data());
  g_misses.fetch_add(1, std::memory_order_relaxed);
  g_bytes_read.fetch_add(bytes, std::memory_order_relaxed);
  return table;
}

AngleCache::Table AngleCache::insert(size_t e, size_t S, uint32_t tag, Table table) {
  std::lock_guard<std::mutex> lock(mu_);
  if (S != stages_) return table;  // the cache moved to another D meanwhile: use, don't keep
  Entry& en = entries_[e];
  if (en.table) {  // another thread cached it meanwhile (or an old tag): keep the newest
    lru_.splice(lru_.begin(), lru_, en.lru);
  } else {
    if (lru_.size() >= slots_) {  // evict the least recently used; users keep their shared_ptr
      entries_[lru_.back()].table.reset();
      lru_.pop_back();
    }
    lru_.push_front(e);
    en.lru = lru_.begin();
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

BMOE_EXPORT void BmoeAngleCacheReset() {
  bmoe::g_hits.store(0);
  bmoe::g_misses.store(0);
  bmoe::g_bytes_read.store(0);
}
