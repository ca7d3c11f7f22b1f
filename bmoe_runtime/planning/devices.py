"""Device profiles: the memory, bandwidth, storage and CPU facts the planner needs.

A profile is a TOML file (devices/*.toml, every fact with its source in a comment) or
`host`, read from the running machine. Units: ram_mb in MiB (2^20 bytes, like
--budget-mb), mem_bandwidth_gbs in GB/s and storage_read_mbs in MB/s (decimal, as
vendors quote them).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from bmoe_runtime.errors import BmoeError

import tomllib

ALIASES = {"jetson": "jetson-orin-nano",  # the current Jetson; the original Nano is end-of-life
           "rpi": "rpi5"}
HOST = "host"
ISA = {"aarch64": {"neon", "dotprod", "i8mm", "fp16", "sve", "sve2"},
       "x86_64": {"sse4_2", "avx", "fma", "f16c", "avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16", "amx"}}
_NEEDS = {"dotprod": "neon", "i8mm": "neon", "fp16": "neon", "sve2": "sve", "avx2": "avx", "fma": "avx",
          "avx512": "avx2", "avx512_vnni": "avx512", "avx512_bf16": "avx512", "avx_vnni": "avx2"}
REQUIRED = ("arch", "ram_mb", "reserved_fraction", "mem_bandwidth_gbs", "storage_read_mbs", "storage_latency_ms",
            "cores", "isa")
OPTIONAL = ("description", "runtime", "detect")
RUNTIMES = ("python", "native")  # bmoe-run, or an app embedding ONNX Runtime + the op library
# Recognising the board we run on: files under / ($BMOE_SYSROOT in tests) whose text must contain a marker.
SYSROOT_ENV = "BMOE_SYSROOT"
_DETECT_READ_LIMIT = 4096


@dataclass(frozen=True)
class Device:
    name: str
    arch: str
    ram_mb: float
    reserved_fraction: float  # share of RAM left to the OS and other apps
    mem_bandwidth_gbs: float | None  # None: unknown (the host is not measured)
    storage_read_mbs: float | None
    storage_latency_ms: float | None
    cores: int
    isa: tuple[str, ...]
    description: str = ""
    source: str = ""  # the TOML file, or "host"
    runtime: str = "python"  # the planner's default runtime for this device
    detect: tuple[tuple[str, str], ...] = ()  # (path relative to /, text it contains): all must hold

    @property
    def is_host(self) -> bool:
        """The `host` pseudo-profile (read from this machine)."""
        return self.source == HOST

    @property
    def is_here(self) -> bool:
        """A run on this machine runs on the device: `host`, or a profile whose board is recognised here."""
        return self.is_host or board_matches(self.detect)

    @property
    def budget_bytes(self) -> int:
        return int(self.ram_mb * (1 - self.reserved_fraction) * 2**20)

    def to_dict(self) -> dict:
        return {**asdict(self), "isa": list(self.isa), "detect": dict(self.detect), "on_this_machine": self.is_here}


def board_matches(detect: tuple[tuple[str, str], ...]) -> bool:
    """True when every detection file exists under the system root and contains its marker text."""
    if not detect:
        return False  # a profile without markers (the phones) is never this Linux host
    root = Path(os.environ.get(SYSROOT_ENV) or "/")
    for rel, marker in detect:
        try:
            with open(root / rel, "rb") as f:  # small sysfs/proc/etc files; read a bounded prefix
                text = f.read(_DETECT_READ_LIMIT).replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return False
        if marker not in text:
            return False
    return True


def search_dirs() -> list[Path]:
    """$BMOE_DEVICES_DIR, then the package's own copy (wheel), then the checkout's devices/."""
    env = os.environ.get("BMOE_DEVICES_DIR")
    pkg = Path(__file__).resolve().parents[1]  # bmoe_runtime/
    return ([Path(env)] if env else []) + [pkg / "devices", pkg.parent / "devices"]


def profile_paths() -> dict[str, Path]:
    """name → file; an earlier directory wins."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        for p in sorted(d.glob("*.toml")) if d.is_dir() else ():
            found.setdefault(p.stem, p)
    return found


def _number(where: str, key: str, v, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise BmoeError(f"{where}: {key} must be a number in {rng}, got {v!r}")
    return float(v)


def validate(data: dict, name: str, where: str) -> Device:
    """A Device from a profile's table; any bad key or value is one clear error line."""
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BmoeError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise BmoeError(f"{where}: missing key(s) {', '.join(missing)}")
    arch = data["arch"]
    if arch not in ISA:
        raise BmoeError(f"{where}: arch must be one of {', '.join(ISA)}, got {arch!r}")
    cores = data["cores"]
    if not isinstance(cores, int) or isinstance(cores, bool) or not 1 <= cores <= 1024:
        raise BmoeError(f"{where}: cores must be a whole number in [1, 1024], got {cores!r}")
    isa = data["isa"]
    if not isinstance(isa, list) or not all(isinstance(x, str) for x in isa):
        raise BmoeError(f"{where}: isa must be a list of strings, got {isa!r}")
    bad = sorted(set(isa) - ISA[arch])
    if bad:
        raise BmoeError(f"{where}: isa {', '.join(bad)} not known for {arch}; known: {', '.join(sorted(ISA[arch]))}")
    for ext in isa:
        if ext in _NEEDS and _NEEDS[ext] not in isa:
            raise BmoeError(f"{where}: isa lists {ext} without {_NEEDS[ext]}, which it implies")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BmoeError(f"{where}: description must be a string, got {description!r}")
    runtime = data.get("runtime", "python")
    if runtime not in RUNTIMES:
        raise BmoeError(f"{where}: runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    detect = data.get("detect", {})
    if not isinstance(detect, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in
                                               detect.items()):
        raise BmoeError(f"{where}: detect must be a table of file = \"text it contains\", got {detect!r}")
    for rel in detect:
        if rel.startswith("/") or ".." in Path(rel).parts or not rel:
            raise BmoeError(f"{where}: detect path {rel!r} must be relative to / without '..'")
    return Device(
        name=name, arch=arch,
        ram_mb=_number(where, "ram_mb", data["ram_mb"], 1, 2**24),  # 1 MiB .. 16 TiB: never a zero budget
        reserved_fraction=_number(where, "reserved_fraction", data["reserved_fraction"], 0, 0.99),
        mem_bandwidth_gbs=_number(where, "mem_bandwidth_gbs", data["mem_bandwidth_gbs"], 0, 10_000, lo_open=True),
        storage_read_mbs=_number(where, "storage_read_mbs", data["storage_read_mbs"], 0, 1_000_000, lo_open=True),
        storage_latency_ms=_number(where, "storage_latency_ms", data["storage_latency_ms"], 0, 10_000),
        cores=cores, isa=tuple(isa), description=description, source=where, runtime=runtime,
        detect=tuple(sorted(detect.items())))


def load_profile(path: str | Path) -> Device:
    p = Path(path)
    if not p.is_file():
        raise BmoeError(f"device profile not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise BmoeError(f"{p} is not valid TOML: {exc}") from None
    return validate(data, p.stem, str(p))


def _host_isa(arch: str) -> list[str]:
    """ISA extensions from /proc/cpuinfo's flags (x86) or Features (Arm) line."""
    words: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    words = set(value.split())
                    break
    except OSError:
        return []
    names = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "asimdhp": "fp16", "sve": "sve", "sve2": "sve2",
             "sse4_2": "sse4_2", "avx": "avx", "fma": "fma", "f16c": "f16c", "avx2": "avx2", "avx_vnni": "avx_vnni",
             "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "amx_tile": "amx"}
    return [ours for theirs, ours in names.items() if theirs in words and ours in ISA.get(arch, ())]


def host_device() -> Device:
    """This machine. Budget = MemAvailable (reserved_fraction = the share in use now); bandwidths unknown."""
    total = avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        total, avail = info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError):
        import psutil  # non-Linux

        vm = psutil.virtual_memory()
        total, avail = vm.total, vm.available
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    machine = platform.machine().lower()
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)
    return Device(name=HOST, arch=arch, ram_mb=total / 2**20, reserved_fraction=round(1 - avail / total, 3),
                  mem_bandwidth_gbs=None, storage_read_mbs=None, storage_latency_ms=None, cores=cores,
                  isa=tuple(_host_isa(arch)), description=f"this machine ({platform.node() or arch})", source=HOST)


def resolve_device(spec: str) -> Device:
    """A profile name, an alias, `host`, or a path to a .toml file."""
    if spec == HOST:
        return host_device()
    if spec.endswith(".toml") or os.sep in spec:
        return load_profile(spec)
    name = ALIASES.get(spec, spec)
    paths = profile_paths()
    if name not in paths:
        known = sorted([*paths, *ALIASES, HOST])
        raise BmoeError(f"unknown device {spec!r}; known: {', '.join(known)} (or a path to a .toml profile)")
    return load_profile(paths[name])


def all_devices() -> list[Device]:
    return [load_profile(p) for p in profile_paths().values()] + [host_device()]


def detected_device() -> Device | None:
    """The bundled profile whose board this machine is, if any."""
    return next((d for d in all_devices() if not d.is_host and d.is_here), None)
