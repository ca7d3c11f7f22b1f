// bmoe_ops_driver: runs ONNX test cases through ONNX Runtime's C/C++ API with the
// ai.bmoe operators registered, and compares outputs with reference files produced
// elsewhere (custom_ops/aarch64/gen_cases.py). No Python on the target.
//
//   bmoe_ops_driver [options] CASES_DIR
//     --register lib:PATH   RegisterCustomOpsLibrary (dlopen libbmoe_ops.so; the default
//                           is lib:<dir of this executable>/libbmoe_ops.so)
//     --register func       RegisterCustomOpsUsingFunction("BmoeRegisterCustomOps")
//                           (static build only: the symbol is exported from the executable)
//     --register direct     BmoeRegisterCustomOps(options, OrtGetApiBase()) called directly
//                           (static build only)
//     --filter SUBSTR       only the cases whose name contains SUBSTR
//     --probe               instead of the cases: try every kernel variant (BMOE_KERNEL)
//                           on the probe case and print which ones are available
//     -v                    print every case, not only failures
//
// CASES_DIR/index.txt lists case directories, one a line. Each holds case.txt:
//   name   NAME
//   model  FILE                          (relative to the case directory)
//   threads N                            (intra-op threads, default 1)
//   input  NAME DTYPE DIMS FILE          (DIMS: comma-separated, e.g. 3,5 or 1,4,0,32)
//   output NAME DTYPE DIMS FILE TOL      (TOL: a number = max abs error, or a file of
//                                         float32 per-element max abs errors)
//   fetch  NAME                          (an output to request but not compare)
//   expect_error TEXT...                 (session creation or Run must fail with an
//                                         ORT error whose message contains TEXT)
// DTYPE: float32 float16 int8 uint8 int64. Data files are raw little-endian, C order.
// Exit status: 0 iff every case passed. Last line: "N passed, N failed".
#include <onnxruntime_cxx_api.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/auxv.h>
#include <unistd.h>
#endif

#ifdef BMOE_DRIVER_STATIC
#include "bmoe_ops.h"
#endif

namespace {

struct TensorSpec {
  std::string name, dtype, file, tol;
  std::vector<int64_t> dims;
};

struct Case {
  std::string dir, name, model, expect_error;
  int threads = 1;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<std::string> fetch;
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<int64_t> parse_dims(const std::string& s) {
  std::vector<int64_t> d;
  if (s == "-") return d;  // scalar
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) d.push_back(std::stoll(tok));
  return d;
}

Case load_case(const std::string& dir) {
  Case c;
  c.dir = dir;
  std::istringstream in(read_file(dir + "/case.txt"));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string key;
    if (!(ls >> key) || key[0] == '#') continue;
    if (key == "name") ls >> c.name;
    else if (key == "model") ls >> c.model;
    else if (key == "threads") ls >> c.threads;
    else if (key == "fetch") c.fetch.emplace_back(), ls >> c.fetch.back();
    else if (key == "expect_error") {
      std::getline(ls >> std::ws, c.expect_error);
    } else if (key == "input" || key == "output") {
      TensorSpec t;
      std::string dims;
      ls >> t.name >> t.dtype >> dims >> t.file;
      if (key == "output") ls >> t.tol;
      if (ls.fail()) throw std::runtime_error(dir + "/case.txt: bad line: " + line);
      t.dims = parse_dims(dims);
      (key == "input" ? c.inputs : c.outputs).push_back(t);
    } else {
      throw std::runtime_error(dir + "/case.txt: unknown key " + key);
    }
  }
  if (c.name.empty() || c.model.empty()) throw std::runtime_error(dir + "/case.txt: needs name and model");
  return c;
}

ONNXTensorElementDataType onnx_type(const std::string& t, size_t* size) {
  if (t == "float32") return *size = 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (t == "float16") return *size = 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (t == "int8") return *size = 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if (t == "uint8") return *size = 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (t == "int64") return *size = 8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  throw std::runtime_error("unknown dtype " + t);
}

size_t numel(const std::vector<int64_t>& dims) {
  size_t n = 1;
  for (int64_t d : dims) n *= static_cast<size_t>(d);
  return n;
}

std::string dims_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

enum class RegMode { Lib, Func, Direct };

struct Options {
  RegMode mode = RegMode::Lib;
  std::string lib;
  std::string filter;
  bool probe = false, verbose = false;
  std::string cases_dir;
};

Ort::SessionOptions session_options(const Options& o, int threads) {
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(threads);
  so.SetInterOpNumThreads(1);
  switch (o.mode) {
    case RegMode::Lib: so.RegisterCustomOpsLibrary(o.lib.c_str()); break;
    case RegMode::Func: so.RegisterCustomOpsUsingFunction("BmoeRegisterCustomOps"); break;
    case RegMode::Direct:
#ifdef BMOE_DRIVER_STATIC
      Ort::ThrowOnError(BmoeRegisterCustomOps(so, OrtGetApiBase()));
#else
      throw std::runtime_error("--register direct needs the static driver (bmoe_ops_driver_static)");
#endif
      break;
  }
  return so;
}

// Runs one case. Returns "" on success, else the reason it failed.
std::string run_case(Ort::Env& env, const Options& o, const Case& c) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<Ort::Value> in_vals;
  std::vector<const char*> in_names, out_names;
  for (const TensorSpec& t : c.inputs) {
    size_t es = 0;
    const ONNXTensorElementDataType type = onnx_type(t.dtype, &es);
    const std::string data = read_file(c.dir + "/" + t.file);
    if (data.size() != numel(t.dims) * es)
      return "input " + t.name + ": " + t.file + " has " + std::to_string(data.size()) + " bytes, expected " +
             std::to_string(numel(t.dims) * es);
    Ort::Value v = Ort::Value::CreateTensor(alloc, t.dims.data(), t.dims.size(), type);
    if (!data.empty()) std::memcpy(v.GetTensorMutableRawData(), data.data(), data.size());
    in_vals.push_back(std::move(v));
    in_names.push_back(t.name.c_str());
  }
  for (const TensorSpec& t : c.outputs) out_names.push_back(t.name.c_str());
  for (const std::string& n : c.fetch) out_names.push_back(n.c_str());

  std::vector<Ort::Value> outs;
  try {
    Ort::SessionOptions so = session_options(o, c.threads);
    const std::string model = c.dir + "/" + c.model;
    Ort::Session sess(env, model.c_str(), so);
    outs = sess.Run(Ort::RunOptions{nullptr}, in_names.data(), in_vals.data(), in_vals.size(), out_names.data(),
                    out_names.size());
  } catch (const Ort::Exception& e) {
    const std::string msg = e.what();
    if (c.expect_error.empty()) return "ORT error: " + msg;
    if (msg.find(c.expect_error) == std::string::npos)
      return "ORT error without \"" + c.expect_error + "\": " + msg;
    if (o.verbose) std::cout << "    (expected error, code " << e.GetOrtErrorCode() << "): " << msg << "\n";
    return "";
  }
  if (!c.expect_error.empty()) return "expected an ORT error containing \"" + c.expect_error + "\", got success";

  for (size_t i = 0; i < c.outputs.size(); ++i) {
    const TensorSpec& t = c.outputs[i];
    if (t.dtype != "float32") return "output " + t.name + ": only float32 outputs are compared";
    auto info = outs[i].GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return "output " + t.name + " is not float32";
    const std::vector<int64_t> shape = info.GetShape();
    if (shape != t.dims) return "output " + t.name + " has shape " + dims_str(shape) + ", expected " + dims_str(t.dims);
    const size_t n = numel(t.dims);
    const std::string ref_s = read_file(c.dir + "/" + t.file);
    if (ref_s.size() != 4 * n) return "reference " + t.file + " has the wrong size";
    std::vector<float> ref(n), tol(n);
    std::memcpy(ref.data(), ref_s.data(), 4 * n);
    char* end = nullptr;
    const double atol = std::strtod(t.tol.c_str(), &end);
    if (end && *end == '\0' && !t.tol.empty()) {
      for (float& x : tol) x = static_cast<float>(atol);
    } else {
      const std::string tol_s = read_file(c.dir + "/" + t.tol);
      if (tol_s.size() != 4 * n) return "tolerance file " + t.tol + " has the wrong size";
      std::memcpy(tol.data(), tol_s.data(), 4 * n);
    }
    const float* y = outs[i].GetTensorData<float>();
    size_t bad = 0, worst = 0;
    double worst_excess = -1;
    for (size_t k = 0; k < n; ++k) {
      const bool both_nan = std::isnan(y[k]) && std::isnan(ref[k]);
      const double err = std::fabs(static_cast<double>(y[k]) - ref[k]);
      if (both_nan || err <= tol[k]) continue;  // NaN error fails here too
      ++bad;
      const double excess = std::isnan(err) ? 1e300 : err - tol[k];
      if (excess > worst_excess) worst_excess = excess, worst = k;
    }
    if (bad) {
      std::ostringstream ss;
      ss << "output " << t.name << ": " << bad << "/" << n << " elements out of tolerance; worst at " << worst
         << ": got " << y[worst] << ", expected " << ref[worst] << " (tol " << tol[worst] << ")";
      return ss.str();
    }
  }
  return "";
}

void usage() {
  std::cerr << "usage: bmoe_ops_driver [--register lib:PATH|func|direct] [--filter SUBSTR] [--probe] [-v] "
               "CASES_DIR\n";
  std::exit(2);
}

std::string exe_dir(const char* argv0) {
  std::string p = argv0;
#if defined(__linux__)
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n > 0) p.assign(buf, static_cast<size_t>(n));
#endif
  const size_t slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

void print_cpu() {
#if defined(__aarch64__) && defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP);
  std::cout << "cpu: aarch64, AT_HWCAP=0x" << std::hex << hw << std::dec << " asimd=" << ((hw >> 1) & 1)
            << " asimddp=" << ((hw >> 20) & 1) << "\n";
#elif defined(__x86_64__)
  std::cout << "cpu: x86_64\n";
#endif
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--register" && i + 1 < argc) {
      const std::string m = argv[++i];
      if (m.rfind("lib:", 0) == 0) o.mode = RegMode::Lib, o.lib = m.substr(4);
      else if (m == "func") o.mode = RegMode::Func;
      else if (m == "direct") o.mode = RegMode::Direct;
      else usage();
    } else if (a == "--filter" && i + 1 < argc) {
      o.filter = argv[++i];
    } else if (a == "--probe") {
      o.probe = true;
    } else if (a == "-v") {
      o.verbose = true;
    } else if (!a.empty() && a[0] == '-') {
      usage();
    } else {
      o.cases_dir = a;
    }
  }
  if (o.cases_dir.empty()) usage();
  if (o.mode == RegMode::Lib && o.lib.empty()) o.lib = exe_dir(argv[0]) + "/libbmoe_ops.so";

  try {
    Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "bmoe_ops_driver");  // errors are reported per case
    print_cpu();
    std::cout << "onnxruntime " << Ort::GetVersionString() << ", registration "
              << (o.mode == RegMode::Lib ? "lib:" + o.lib : o.mode == RegMode::Func ? "func" : "direct")
              << ", BMOE_KERNEL=" << (std::getenv("BMOE_KERNEL") ? std::getenv("BMOE_KERNEL") : "(unset)") << "\n";

    std::vector<std::string> dirs;
    {
      std::istringstream idx(read_file(o.cases_dir + "/index.txt"));
      std::string d;
      while (std::getline(idx, d))
        if (!d.empty() && d[0] != '#') dirs.push_back(o.cases_dir + "/" + d);
    }

    if (o.probe) {  // which variants does select_variant() accept on this CPU?
      Case probe;
      for (const std::string& d : dirs)
        if (load_case(d).name == "probe") probe = load_case(d);
      if (probe.name.empty()) throw std::runtime_error("no case named probe");
      for (const char* v : {"scalar", "neon", "dotprod", "avx2", "avx512", ""}) {
        if (*v) setenv("BMOE_KERNEL", v, 1);
        else unsetenv("BMOE_KERNEL");
        const std::string r = run_case(env, o, probe);
        std::cout << "kernel " << (*v ? v : "(auto)") << ": " << (r.empty() ? "available" : "unavailable: " + r)
                  << "\n";
      }
      return 0;
    }

    int passed = 0, failed = 0;
    for (const std::string& d : dirs) {
      Case c;
      std::string r;
      try {
        c = load_case(d);
        if (!o.filter.empty() && c.name.find(o.filter) == std::string::npos) continue;
        r = run_case(env, o, c);
      } catch (const std::exception& e) {
        r = std::string("driver error: ") + e.what();
        if (c.name.empty()) c.name = d;
      }
      if (r.empty()) {
        ++passed;
        if (o.verbose) std::cout << "PASS " << c.name << "\n";
      } else {
        ++failed;
        std::cout << "FAIL " << c.name << ": " << r << "\n";
      }
      std::cout.flush();
    }
    std::cout << passed << " passed, " << failed << " failed\n";
    return failed == 0 && passed > 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "bmoe_ops_driver: " << e.what() << "\n";
    return 2;
  }
}
