// Files a node names (a streamed angle_file) are untrusted input: they are opened only
// inside the model's directory (docs/ops.md, "angle_file: confined to the model directory").
#pragma once
#include <cstdint>
#include <string>

namespace bmoe {

struct ModelFile {
  int fd = -1;       // open for reading (O_CLOEXEC); owned by the caller
  uint64_t size = 0;  // st_size at open
  std::string path;  // model_dir + "/" + the normalised relative path (identity and messages)
};

// Opens `file` (relative to `model_dir`, or absolute and inside it) as a regular file:
// ".." may not climb out of the directory, no path component may be a symbolic link,
// and a FIFO, device, socket or directory is refused without blocking. Throws OpError
// naming `what` (e.g. "angle_file") and the path.
ModelFile open_model_file(const std::string& model_dir, const std::string& file, const char* what);

}  // namespace bmoe
