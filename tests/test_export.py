"""bmoe-export + the Numba reference runtime: parity with PyTorch, formats, bad input."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bmoe_runtime import ButterflyMoE
from bmoe_runtime.format.butterfly_layout import active_mask
from bmoe_runtime.nn.butterfly import ButterflyRotation

from ops_reference import use_ort
from bmoe_runtime.train.checkpoint import save_checkpoint
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.runtime.generate import Generator
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.backends.numba_ops import OpError, butterfly_rotate
from bmoe_runtime.runtime.session import ModelSession
from bmoe_runtime.format.tokenizer import ByteTokenizer
from exporters import ExportOptions, export_checkpoint, export_module
from exporters.packed import encode_angles

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path, seed: int = 0, **cfg) -> MoELM:
    torch.manual_seed(seed)
    base = dict(d_model=48, n_layers=2, n_heads=4, d_ff=96, n_experts=4, top_k=2, max_seq=64)  # 48, 96: not 2^k
    model = MoELM(ModelConfig(**{**base, **cfg})).eval()
    with torch.no_grad():  # trained-looking angles: far from identity, so rotations matter
        for name, p in model.named_parameters():
            if name.endswith("angles"):
                p.normal_(0, 0.5)
    save_checkpoint(path, model, ByteTokenizer(), {})
    return model


def torch_logits(model: MoELM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()  # [T, V]


PROMPT = list(b"To be, or not")


@pytest.mark.parametrize("form", ["paper", "ffn"])
@pytest.mark.parametrize("variant", ["butterfly", "dense", "ternary", "static"])
def test_lm_parity_and_greedy_tokens(tmp_path, variant, form):
    model = make_checkpoint(tmp_path / "m.pt", variant=variant, expert_form=form)
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "x", ExportOptions(angle_dtype="fp32"))
    gen = Generator(ModelSession(out, backend="numba"))
    logits, past = gen.step(np.array([PROMPT], np.int64), gen.empty_cache())
    assert np.abs(logits[0] - torch_logits(model, PROMPT)).max() <= 1e-4
    # incremental decoding through the KV cache matches a full forward
    nxt = [3, 7]
    step_logits, _ = gen.step(np.array([nxt], np.int64), past)
    assert np.abs(step_logits[0] - torch_logits(model, PROMPT + nxt)[-2:]).max() <= 1e-4
    ours = list(gen.tokens(PROMPT, 32))
    ref = model.generate(torch.tensor([PROMPT]), 32)[0, len(PROMPT):].tolist()
    assert ours == ref
    if use_ort():  # the C++ ops on the same file: same logits, same tokens as the Numba runtime
        fast = Generator(ModelSession(out, backend="ort"))
        ort_logits, _ = fast.step(np.array([PROMPT], np.int64), fast.empty_cache())
        assert np.abs(ort_logits - logits).max() <= 1e-4
        assert list(fast.tokens(PROMPT, 32)) == ours


def with_angles(model: MoELM, stored: str) -> MoELM:
    """A copy of `model` whose rotation angles are what an export with `stored` angles holds, rebuilt
    independently in float64: fp16 = nearest half; int8 = per-expert step max|θ|/127, q = round(θ/step)
    (`trunc` = the wrong rule, q = trunc(θ/step), for the test that shows the check tells them apart)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for rot in (m for m in ref.modules() if isinstance(m, ButterflyRotation)):
            a = torch.where(rot.active, rot.angles.double(), torch.zeros((), dtype=torch.float64))
            if stored == "fp16":
                a = a.half().double()
            elif stored in ("int8", "trunc"):
                step = a.abs().amax(dim=(1, 2), keepdim=True) / 127
                a = (torch.round(a / step) if stored == "int8" else torch.trunc(a / step)) * step
            rot.angles.copy_(a)
    return ref


@pytest.mark.parametrize("packing,angles", [("base3", "fp32"), ("2bit", "fp16"), ("base3", "int8")])
def test_packings_and_angle_dtypes_round_trip(tmp_path, packing, angles):
    model = make_checkpoint(tmp_path / "m.pt")
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "x", ExportOptions(packing, angles))
    gen = Generator(ModelSession(out, backend="numba"))
    logits, _ = gen.step(np.array([PROMPT], np.int64), gen.empty_cache())
    # the file equals the PyTorch model with its angles stored as the format says: float32 rounding only
    err = np.abs(logits[0] - torch_logits(with_angles(model, angles), PROMPT)).max()
    assert err <= 1e-4, f"{packing}/{angles}: max abs logit error {err}"
    if angles == "int8":  # truncating instead of rounding would be caught: its error is far above 1e-4
        assert np.abs(logits[0] - torch_logits(with_angles(model, "trunc"), PROMPT)).max() > 1e-2
    manifest = json.loads((out / "manifest.json").read_text())
    angle_dtypes = {t["dtype"] for t in manifest["tensors"].values() if t["kind"] == "angles" and t["file"] == "angles.bin"}
    assert {"fp32": "float32", "fp16": "float16", "int8": "int8"}[angles] in angle_dtypes


def test_stored_angle_error_is_within_half_a_step():
    """Rounding to the storage grid errs by at most half a step: int8 step = max|θ_e|/127 per expert;
    fp16 relative step 2^-10 (10 mantissa bits). Truncation would err by up to a whole step."""
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(6, 7, 64, generator=g) * 2 - 1) * 3  # [E, S, P/2]
    active = torch.from_numpy(active_mask(100))
    theta = torch.where(active, angles, torch.zeros(()))
    q, scale = encode_angles(angles, active, "int8")
    assert q.dtype == torch.int8 and scale.shape == (6,)
    step = theta.abs().amax(dim=(1, 2)) / 127
    torch.testing.assert_close(scale, step, rtol=1e-6, atol=0)
    err = (q.float() * scale[:, None, None] - theta).abs() / step[:, None, None]
    assert err.max() <= 0.5 + 1e-4 and err.max() > 0.45  # half a step, reached: not a looser rule
    assert (q[:, ~active] == 0).all()
    h, none = encode_angles(angles, active, "fp16")
    assert h.dtype == torch.float16 and none is None
    # half a step of the nearest half: 2^-11 relative for normal halves, 2^-25 absolute among subnormals
    rel = ((h.float() - theta).abs() / (theta.abs() * 2.0 ** -11).clamp_min(2.0 ** -25))[:, active]
    assert rel.max() <= 1 and rel.max() > 0.5


@pytest.mark.parametrize("transpose", [0, 1])
def test_int8_rotation_error_bound(transpose):
    """Each stage is a block of Givens rotations; an angle error δ moves a rotation by ≤ |δ| in operator
    norm, so S stages move ‖B x‖ by ≤ S · max|δ| · ‖x‖, with max|δ| ≤ step/2 (the test above)."""
    rng = np.random.default_rng(1)
    d, s_count = 100, 7
    theta = rng.uniform(-3, 3, (4, s_count, 64)).astype(np.float32)
    q, scale = encode_angles(torch.from_numpy(theta), torch.from_numpy(active_mask(d)), "int8")
    x = rng.standard_normal((50, d)).astype(np.float32)
    idx = rng.integers(0, 4, 50).astype(np.int64)
    exact = butterfly_rotate(x, theta, idx, None, transpose)
    stored = butterfly_rotate(x, q.numpy(), idx, scale.numpy(), transpose)
    bound = s_count * (scale.numpy()[idx] / 2) * np.linalg.norm(x, axis=1)
    err = np.linalg.norm(stored - exact, axis=1)
    assert np.all(err <= bound + 1e-5) and err.max() > 0


class Classifier(nn.Module):
    """A user's own module with a bmoe layer inside: not an LM."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(20, 32)
        self.moe = ButterflyMoE(32, 64, n_experts=6, top_k=2, expert_form="ffn")
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.moe(self.inp(x))))


def test_user_module_export(tmp_path):
    torch.manual_seed(1)
    clf = Classifier().eval()
    x = torch.randn(7, 20)
    out = export_module(clf, (x,), tmp_path / "clf", ["x"], ["scores"],
                        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, options=ExportOptions(angle_dtype="fp32"))
    sess = ModelSession(out, backend="numba")
    xs = torch.randn(3, 20)  # another batch size than the example
    got = sess.run({"x": xs.numpy()})["scores"]
    with torch.no_grad():
        assert np.abs(got - clf(xs).numpy()).max() <= 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["expert_banks"] == 2 and manifest["bytes_by_kind"]["angles"] > 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("exp")
    make_checkpoint(d / "m.pt")
    return export_checkpoint(d / "m.pt", d / "x")


def copy_of(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def test_truncated_angle_file_is_refused(exported, tmp_path):
    d = copy_of(exported, tmp_path)
    data = (d / "angles.bin").read_bytes()
    (d / "angles.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BmoeError, match="truncated"):
        ModelSession(d, backend="numba")


def test_corrupted_weights_fail_checksum(exported, tmp_path):
    d = copy_of(exported, tmp_path)
    data = bytearray((d / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (d / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BmoeError, match="sha256"):
        ModelSession(d, backend="numba")


def test_corrupted_onnx_is_a_clear_error(exported, tmp_path):
    d = copy_of(exported, tmp_path)
    (d / "model.onnx").write_bytes(b"\x08garbage" * 10)
    with pytest.raises(BmoeError):
        ModelSession(d, backend="numba", verify=False)  # even past the checksum, loading fails cleanly


def test_not_a_model_directory(tmp_path):
    with pytest.raises(BmoeError, match="manifest"):
        ModelSession(tmp_path, backend="numba")


def test_wrong_input_shape_and_dtype(exported):
    sess = ModelSession(exported, backend="numba")
    gen = Generator(sess)
    feeds = {"input_ids": np.array([[1, 2]], np.int64)}
    feeds.update({n: np.zeros((1, 4, 0, 12), np.float32) for n in sess.inputs if n != "input_ids"})
    sess.run(feeds)
    with pytest.raises(BmoeError, match="int64"):
        sess.run({**feeds, "input_ids": feeds["input_ids"].astype(np.int32)})
    with pytest.raises(BmoeError, match="rank"):
        sess.run({**feeds, "input_ids": np.array([1, 2], np.int64)})
    with pytest.raises(BmoeError, match="axis 1"):
        sess.run({**feeds, "past_key_0": np.zeros((1, 3, 0, 12), np.float32)})
    with pytest.raises(BmoeError, match="max_seq"):
        list(gen.tokens([1] * 60, 10))


def test_expert_index_out_of_range_in_op():
    x = np.ones((3, 8), np.float32)
    angles = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(OpError, match=r"expert_index\[1\] = 2"):
        butterfly_rotate(x, angles, np.array([0, 2, 1]), None, 0)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "m.pt")
    import exporters.onnx_export as ox

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ox.onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError):
        export_checkpoint(tmp_path / "m.pt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_export_cli_rejects_incompatible_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    r = run_cli("-m", "exporters.cli", str(tmp_path / "other.pt"), "-o", str(tmp_path / "x"))
    assert r.returncode != 0 and "not a bmoe checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_run_cli_on_missing_model_is_one_line_error(tmp_path):
    r = run_cli("-m", "bmoe_runtime.cli", "run", str(tmp_path / "nope"), "--backend", "numba")
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr
