#!/usr/bin/env bash
# The base install (the runtime) resolves no torch (nor numba, an extra), and bmoe-run works in it.
# Prints its installed size.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/rt
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q --report "$venv/report.json" . 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/python" - "$venv/report.json" <<'PY'
import json, sys
names = sorted(i["metadata"]["name"].lower() for i in json.load(open(sys.argv[1]))["install"])
print("runtime-only install:", ", ".join(names))
bad = [n for n in names if n in ("torch", "onnxscript", "triton", "numba", "llvmlite") or n.startswith("nvidia-")]
sys.exit(f"runtime-only install pulled in {bad}" if bad else 0)
PY
"$venv/bin/python" -c "import torch" 2>/dev/null && { echo "torch importable in the runtime-only venv"; exit 1; }
cd "$(dirname "$venv")"  # outside the checkout: the installed package, not the source tree
"$venv/bin/bmoe-run" --prompt "ROMEO:" -n 16 --temperature 0 >/dev/null
"$venv/bin/bmoe" plan --device rpi5 >/dev/null
err=$("$venv/bin/bmoe-run" --backend numba -n 4 2>&1 >/dev/null) && { echo "numba backend ran without numba"; exit 1; }
case "$err" in *"pip install 'bmoe[numba]'"*) ;; *) echo "unclear error without numba: $err"; exit 1;; esac
echo "runtime-only install: $(du -sm "$venv/lib" | cut -f1) MiB installed (site-packages), bmoe-run OK"
