#include "model_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <string>
#include <system_error>
#include <vector>

#include "ort_glue.h"

namespace bmoe {
namespace {

std::string err_text(int err) { return std::error_code(err, std::generic_category()).message(); }

// Closes on scope exit.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

// `path`'s components with "" and "." dropped and each ".." removing the one before it;
// false if a ".." would climb above the start.
bool normalise(const std::string& path, std::vector<std::string>* out) {
  out->clear();
  size_t i = 0;
  while (i <= path.size()) {
    const size_t j = std::min(path.find('/', i), path.size());
    const std::string c = path.substr(i, j - i);
    if (c == "..") {
      if (out->empty()) return false;
      out->pop_back();
    } else if (!c.empty() && c != ".") {
      out->push_back(c);
    }
    i = j + 1;
  }
  return true;
}

// The components of `file` below `dir` if `file` (absolute, normalised) starts with them.
bool strip_prefix(const std::vector<std::string>& file, const std::vector<std::string>& dir,
                  std::vector<std::string>* rest) {
  if (file.size() <= dir.size()) return false;
  for (size_t i = 0; i < dir.size(); ++i)
    if (file[i] != dir[i]) return false;
  rest->assign(file.begin() + static_cast<std::ptrdiff_t>(dir.size()), file.end());
  return true;
}

const char* kind_of(mode_t m) {
  return S_ISLNK(m) ? "a symbolic link" : S_ISFIFO(m) ? "a FIFO" : S_ISCHR(m) ? "a character device"
       : S_ISBLK(m) ? "a block device" : S_ISSOCK(m) ? "a socket" : S_ISDIR(m) ? "a directory" : "not a regular file";
}

int open_retry(int dir, const char* name, int flags) {
  int fd;
  do fd = ::openat(dir, name, flags);
  while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

ModelFile open_model_file(const std::string& model_dir, const std::string& file, const char* what) {
  const std::string named = std::string(what) + " '" + file + "'";
  if (model_dir.empty())
    throw OpError(named + ": the model directory is not known (set the session config entry bmoe.model_dir "
                  "before registering the library)");
  if (file.empty() || file.find('\0') != std::string::npos) throw OpError(named + " is not a valid path");

  std::vector<std::string> rel;
  if (file[0] == '/') {  // allowed only inside the model directory (as given or resolved)
    std::vector<std::string> abs, dir;
    std::string given = model_dir;
    if (given[0] != '/') {
      char cwd[PATH_MAX];
      if (!::getcwd(cwd, sizeof cwd)) throw OpError(named + ": cannot resolve the model directory");
      given = std::string(cwd) + "/" + given;
    }
    bool inside = normalise(file, &abs) && normalise(given, &dir) && strip_prefix(abs, dir, &rel);
    if (!inside) {
      char real[PATH_MAX];
      inside = ::realpath(model_dir.c_str(), real) && normalise(real, &dir) && strip_prefix(abs, dir, &rel);
    }
    if (!inside) throw OpError(named + " is outside the model directory '" + model_dir + "'");
  } else if (!normalise(file, &rel) || rel.empty()) {
    throw OpError(named + " leaves the model directory '" + model_dir + "'");
  }

  std::string shown = model_dir;
  for (const std::string& c : rel) shown += "/" + c;
  Fd dir(open_retry(AT_FDCWD, model_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.fd < 0) throw OpError(named + ": cannot open the model directory '" + model_dir + "': " + err_text(errno));
  for (size_t i = 0; i < rel.size(); ++i) {
    const bool last = i + 1 == rel.size();
    // Look before opening: a FIFO or device is refused without ever being opened.
    struct stat st;
    if (::fstatat(dir.fd, rel[i].c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
      throw OpError("cannot open " + named + " ('" + shown + "'): " + err_text(errno));
    if (last ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode))
      throw OpError(named + ": '" + rel[i] + "' is " + kind_of(st.st_mode) +
                    (last ? " (must be a regular file)" : " (must be a directory; links are not followed)"));
    // O_NOFOLLOW | O_NONBLOCK: what was swapped in since the look is still neither followed nor waited on.
    const int flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | (last ? O_NONBLOCK : O_DIRECTORY);
    Fd next(open_retry(dir.fd, rel[i].c_str(), flags));
    if (next.fd < 0) throw OpError("cannot open " + named + " ('" + shown + "'): " + err_text(errno));
    std::swap(dir.fd, next.fd);
  }
  struct stat st;
  if (::fstat(dir.fd, &st) != 0) throw OpError("cannot stat " + named + ": " + err_text(errno));
  if (!S_ISREG(st.st_mode)) throw OpError(named + " is " + kind_of(st.st_mode) + " (must be a regular file)");
  const int fl = ::fcntl(dir.fd, F_GETFL);
  if (fl >= 0) ::fcntl(dir.fd, F_SETFL, fl & ~O_NONBLOCK);  // ordinary blocking reads from here on
  ModelFile out;
  out.size = static_cast<uint64_t>(st.st_size);
  out.path = shown;
  out.fd = dir.release();
  return out;
}

}  // namespace bmoe
