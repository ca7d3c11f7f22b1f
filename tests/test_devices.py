"""Device profiles: bundled files, aliases, the host, and clear errors for bad profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bmoe_runtime.planning import devices
from bmoe_runtime.cli import main_cli
from bmoe_runtime.planning.devices import resolve_device
from bmoe_runtime.errors import BmoeError

GOOD = {"arch": '"aarch64"', "ram_mb": "4096", "reserved_fraction": "0.2", "mem_bandwidth_gbs": "17",
        "storage_read_mbs": "90", "storage_latency_ms": "0.7", "cores": "4", "isa": '["neon", "dotprod"]'}


def write_profile(tmp_path: Path, name: str = "dev", drop: str | None = None, **over: str) -> Path:
    fields = {k: v for k, v in {**GOOD, **over}.items() if k != drop}
    path = tmp_path / f"{name}.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    return path


@pytest.mark.parametrize("name, ram_mb, cores, dotprod", [
    ("jetson-nano", 4096, 4, False), ("jetson-orin-nano", 8192, 6, True), ("rpi4", 4096, 4, False),
    ("rpi5", 8192, 4, True), ("android-sd8gen2", 8192, 8, True), ("iphone-a17", 8192, 6, True)])
def test_bundled_profiles(name, ram_mb, cores, dotprod):
    d = resolve_device(name)
    assert (d.name, d.ram_mb, d.cores, "dotprod" in d.isa, d.arch) == (name, ram_mb, cores, dotprod, "aarch64")
    assert 0 < d.budget_bytes < ram_mb * 2**20 and d.mem_bandwidth_gbs > 0 and not d.is_host


def test_aliases():
    assert resolve_device("jetson").name == "jetson-orin-nano"
    assert resolve_device("rpi").name == "rpi5"


def test_host_profile():
    h = resolve_device("host")
    total_kib = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
    assert h.is_host and h.ram_mb == pytest.approx(total_kib / 1024)
    assert h.cores >= 1 and 0 <= h.reserved_fraction < 1 and h.mem_bandwidth_gbs is None
    assert h.arch in devices.ISA and set(h.isa) <= devices.ISA[h.arch]


def test_profile_dir_from_env(tmp_path, monkeypatch):
    write_profile(tmp_path, "mine")
    monkeypatch.setenv("BMOE_DEVICES_DIR", str(tmp_path))
    assert resolve_device("mine").ram_mb == 4096
    assert resolve_device("rpi5").cores == 4  # the bundled ones stay visible


def test_user_profile_by_path(tmp_path):
    d = resolve_device(str(write_profile(tmp_path, "board")))
    assert (d.name, d.isa, d.storage_latency_ms) == ("board", ("neon", "dotprod"), 0.7)


@pytest.mark.parametrize("over, msg", [
    ({"drop": "cores"}, "missing key(s) cores"),
    ({"speed": "3"}, "unknown key(s) speed"),
    ({"ram_mb": "0"}, "ram_mb must be a number in [1,"),
    ({"ram_mb": "-4"}, "ram_mb must be a number in [1,"),
    ({"ram_mb": "1e-300"}, "ram_mb must be a number in [1,"),  # was a zero budget: ZeroDivisionError
    ({"ram_mb": "nan"}, "ram_mb must be a number"),
    ({"ram_mb": '"4GB"'}, "ram_mb must be a number"),
    ({"reserved_fraction": "1.0"}, "reserved_fraction must be a number in [0, 0.99]"),
    ({"reserved_fraction": "0.9999999"}, "reserved_fraction must be a number in [0, 0.99]"),
    ({"reserved_fraction": "-0.1"}, "reserved_fraction must be a number in [0, 0.99]"),
    ({"cores": "0"}, "cores must be a whole number"),
    ({"cores": "2.5"}, "cores must be a whole number"),
    ({"mem_bandwidth_gbs": "0"}, "mem_bandwidth_gbs must be a number"),
    ({"storage_latency_ms": "-1"}, "storage_latency_ms must be a number"),
    ({"arch": '"mips"'}, "arch must be one of"),
    ({"isa": '["avx2"]'}, "isa avx2 not known for aarch64"),
    ({"isa": '["dotprod"]'}, "isa lists dotprod without neon"),
    ({"isa": '"neon"'}, "isa must be a list of strings"),
    ({"cores": "= 4"}, "is not valid TOML"),
])
def test_bad_profiles_are_one_line_errors(tmp_path, over, msg):
    path = write_profile(tmp_path, **over)
    with pytest.raises(BmoeError) as err:
        resolve_device(str(path))
    assert msg in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_device_lists_known():
    with pytest.raises(BmoeError, match="unknown device 'toaster'; known: .*rpi5"):
        resolve_device("toaster")


def test_devices_cli_lists_all():
    r = CliRunner().invoke(main_cli, ["devices"])
    assert r.exit_code == 0
    for name in ("jetson-nano", "jetson-orin-nano", "rpi4", "rpi5", "android-sd8gen2", "iphone-a17", "host",
                 "jetson -> jetson-orin-nano", "rpi -> rpi5"):
        assert name in r.output


def test_bad_profile_on_the_cli_has_no_traceback(tmp_path):
    path = write_profile(tmp_path, reserved_fraction="1.5")
    r = CliRunner().invoke(main_cli, ["plan", "--device", str(path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [f"Error: {path}: reserved_fraction must be a number in [0, 0.99], got 1.5"]


# --- on-device detection: a faked board root ($BMOE_SYSROOT) -------------------------------------------------

BOARDS = {"rpi5": "Raspberry Pi 5 Model B Rev 1.0", "jetson-orin-nano": "NVIDIA Jetson Orin Nano Developer Kit",
          "jetson-nano": "NVIDIA Jetson Nano Developer Kit", "rpi4": "Raspberry Pi 4 Model B Rev 1.4"}


def fake_board(tmp_path: Path, model: str) -> Path:
    root = tmp_path / "sysroot"
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")  # the kernel NUL-terminates it
    return root


@pytest.mark.parametrize("board", BOARDS)
def test_each_board_is_recognised_as_itself_only(tmp_path, monkeypatch, board):
    monkeypatch.setenv(devices.SYSROOT_ENV, str(fake_board(tmp_path, BOARDS[board])))
    here = {d.name for d in devices.all_devices() if d.is_here}
    assert here == {board, "host"}  # "Jetson Orin Nano" must not read as the original "Jetson Nano"
    assert devices.detected_device().name == board


def test_no_board_and_phones_are_never_here(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.SYSROOT_ENV, str(tmp_path))  # an x86 box: no device tree
    assert [d.name for d in devices.all_devices() if d.is_here] == ["host"]
    assert devices.detected_device() is None
    phones = [resolve_device(n) for n in ("android-sd8gen2", "iphone-a17")]
    assert all(p.detect == () and p.runtime == "native" for p in phones)


def test_detect_paths_must_stay_under_the_root(tmp_path):
    for bad in ('"/proc/device-tree/model"', '"../etc/passwd"'):
        p = tmp_path / "dev.toml"
        p.write_text("".join(f"{k} = {v}\n" for k, v in GOOD.items()) + f'[detect]\n{bad} = "x"\n')
        with pytest.raises(BmoeError, match="must be relative to / without"):
            devices.load_profile(p)


def test_devices_cli_marks_the_board(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.SYSROOT_ENV, str(fake_board(tmp_path, BOARDS["rpi5"])))
    r = CliRunner().invoke(main_cli, ["devices"])
    assert r.exit_code == 0, r.output
    marked = [line.split()[1] for line in r.output.splitlines() if line.startswith("* ") and len(line.split()) > 2]
    assert marked == ["rpi5"]


def _run(tmp_path, monkeypatch, device: str) -> tuple[dict, str]:
    import json

    r = CliRunner().invoke(main_cli, ["run", "--device", device, "-n", "4", "--temperature", "0",
                                      "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / "r.json").read_text()), r.output


@pytest.mark.parametrize("board, device", [("rpi5", "rpi5"), ("jetson-orin-nano", "jetson")])
def test_run_on_the_board_measures_and_estimates_nothing(tmp_path, monkeypatch, board, device):
    monkeypatch.setenv(devices.SYSROOT_ENV, str(fake_board(tmp_path, BOARDS[board])))
    monkeypatch.setenv("BMOE_OVERHEAD_MB", "300")  # this test process holds torch; the overhead is not the point
    rep, out = _run(tmp_path, monkeypatch, device)
    assert rep["on_device"] is True and "estimate" not in rep and rep["memory"]["peak_rss_bytes"] > 0
    assert "NOT run" not in out and "ESTIMATE" not in out and f"measured on {board} itself" in out


def test_run_on_another_board_says_it_is_not_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.SYSROOT_ENV, str(fake_board(tmp_path, BOARDS["jetson-orin-nano"])))
    monkeypatch.setenv("BMOE_OVERHEAD_MB", "300")
    rep, out = _run(tmp_path, monkeypatch, "rpi5")
    assert rep["on_device"] is False and "estimate" in rep
    assert "NOT run on rpi5" in out and "ESTIMATE for rpi5" in out


def test_plan_for_a_phone_is_native(monkeypatch):
    monkeypatch.delenv("BMOE_OVERHEAD_MB", raising=False)
    r = CliRunner().invoke(main_cli, ["plan", "--device", "android-sd8gen2", "--json", "/dev/stdout"])
    assert r.exit_code == 0, r.output
    assert "runtime (native app; measured)" in r.output and "runtime (ort" not in r.output
    r = CliRunner().invoke(main_cli, ["plan", "--device", "android-sd8gen2", "--runtime", "native", "--backend",
                                      "numba"])
    assert r.exit_code == 1 and "use --backend ort" in r.output
    r = CliRunner().invoke(main_cli, ["plan", "--device", "rpi5", "--runtime", "native", "--overhead-mb", "41.5"])
    assert r.exit_code == 0 and "runtime (native app; given)" in r.output and "41.500" in r.output
