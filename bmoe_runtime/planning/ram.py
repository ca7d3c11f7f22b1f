"""This process's measured memory: peak RSS, current RSS and PSS, in bytes (None where unknown).

Linux reads /proc/self (VmHWM/VmRSS from status, Pss from smaps_rollup); elsewhere
psutil and resource stand in, and what they cannot tell is None.
"""

from __future__ import annotations


def _proc_kib(path: str, key: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int | None:
    """High-water mark of resident memory since the process started (or since reset_peak)."""
    v = _proc_kib("/proc/self/status", "VmHWM")
    if v is None:
        try:
            import resource
            import sys

            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            v = ru if sys.platform == "darwin" else ru * 1024  # macOS reports bytes, others KiB
        except (ImportError, OSError):
            return None
    return v


def current_rss() -> int | None:
    v = _proc_kib("/proc/self/status", "VmRSS")
    if v is None:
        try:
            import psutil

            v = psutil.Process().memory_info().rss
        except Exception:  # psutil missing or not permitted
            return None
    return v


def pss() -> int | None:
    """Proportional set size now: shared library pages divided among the processes mapping them."""
    v = _proc_kib("/proc/self/smaps_rollup", "Pss")
    if v is None:
        try:
            import psutil

            v = getattr(psutil.Process().memory_full_info(), "pss", None)
        except Exception:
            return None
    return v


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux ≥ 4.0), to measure one phase; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure() -> dict[str, int | None]:
    return {"peak_rss_bytes": peak_rss(), "rss_bytes": current_rss(), "pss_bytes": pss()}
