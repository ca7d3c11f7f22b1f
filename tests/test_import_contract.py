"""The runtime half never imports the torch half: what ships to a device installs and runs without torch.

Two checks: a static one over every import statement (any nesting level) of the runtime packages, and a
dynamic one that imports every runtime module in a fresh interpreter where `import torch` fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bmoe_runtime"
RUNTIME = ["format", "runtime", "backends", "planning"]  # subpackages that ship to a device
RUNTIME_FILES = ["errors.py", "choices.py", "__init__.py"]
FORBIDDEN = ("torch", "onnxscript", "tqdm", "exporters", "bmoe_runtime.nn", "bmoe_runtime.train")


def runtime_modules() -> list[Path]:
    files = [PKG / f for f in RUNTIME_FILES]
    for sub in RUNTIME:
        files += sorted((PKG / sub).glob("*.py"))
    return files


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]  # `from bmoe_runtime import nn`
    return names


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_runtime_module_imports_nothing_from_the_torch_side(path: Path):
    bad = [n for n in imported_names(path) if forbidden(n)]
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_the_checker_sees_a_violation(tmp_path):
    """The static check itself: nested, relative and aliased imports of the torch side are all found."""
    mod = PKG / "runtime" / "_contract_probe.py"
    mod.write_text("def f():\n    from ..nn import moe\n    import torch.nn as tnn\n", encoding="utf-8")
    try:
        assert [n for n in imported_names(mod) if forbidden(n)] == ["bmoe_runtime.nn", "bmoe_runtime.nn.moe",
                                                                     "torch.nn"]
    finally:
        mod.unlink()


def test_runtime_imports_and_runs_with_torch_unimportable():
    """Every runtime module, the CLI module and the public session API load with torch blocked — and with numba
    blocked too (an extra), except the Numba kernels themselves; the numba backend then says what to install."""
    mods = ["bmoe_runtime", "bmoe_runtime.cli"] + [
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts) for p in runtime_modules()
        if p.name != "__init__.py" and p.name != "numba_ops.py"]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnxscript', 'numba'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "from bmoe_runtime import ModelSession, Generator, default_model_dir\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'numba') or m.startswith('bmoe_runtime.nn')]\n"
        "from bmoe_runtime.errors import BmoeError\n"
        "try:\n"
        "    ModelSession(default_model_dir(), backend='numba')\n"
        "except BmoeError as e:\n"
        "    assert \"pip install 'bmoe[numba]'\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('the numba backend ran without numba')\n"
        "try:\n"
        "    from bmoe_runtime import ButterflyMoE\n"
        "except ImportError as e:\n"
        "    print('torch side needs torch:', e)\n"
        "else:\n"
        "    raise SystemExit('ButterflyMoE imported without torch')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch side needs torch: blocked: torch" in r.stdout
