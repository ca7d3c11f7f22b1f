"""One optimizer step of the trainer, eager or captured once as a CUDA graph and replayed.

Both are `step(x, y, lr) -> (loss, ce)`: forward under autocast (bf16 on CUDA), backward, gradient clipping,
AdamW; the returned tensors stay on the device (read them at log steps only: reading syncs the host).

The graphed step exists because the eager step of a small model is bound by the host (Python, autograd,
hundreds of kernel launches per step), not by the GPU (docs/training.md). What capture needs, and how:
- static inputs: each batch is copied into fixed device buffers (from pinned memory, asynchronously);
- the learning rate as a float32 device tensor refilled before each replay (fused AdamW reads it there;
  `capturable=True` keeps the step counters on the device too);
- gradient clipping inside the graph (clip_grad_norm_ computes and applies the norm on the device);
- router noise and dropout: torch's CUDA generator is graph-safe. A replay reads the generator's seed and
  offset from device tensors refreshed before it and then advances the offset by what the capture consumed,
  so it draws the numbers an eager step would from the same state, and torch.cuda.get_rng_state() after k
  replays equals the state after k eager steps: saving and restoring it for --resume needs nothing new;
- warm-up (Triton compilation, cuBLAS workspaces, AdamW's lazily created state, torch.compile) runs eagerly
  on a side stream and is then undone (`unchanged_by`): the first replay is the run's next step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

Step = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → CUDA without making the host wait for the GPU (as a copy from pageable memory does)."""
    return t.to(device) if device.type != "cuda" else _pinned(t).to(device, non_blocking=True)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    # torch keeps a pinned block reserved until the asynchronous copy that reads it has run
    return t if t.is_cuda else t.pin_memory()


def _autocast(device: torch.device, **kw) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, **kw) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)


def eager_step(loss_fn: LossFn, model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> Step:
    """The step run op by op. `loss_fn` may be `model.loss`, a DDP wrapper of it, or its torch.compile."""
    device = next(model.parameters()).device
    params = list(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = to_device(x, device), to_device(y, device)
        for g in opt.param_groups:
            g["lr"] = lr
        with _autocast(device):
            loss, ce = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return loss, ce

    return step


class GraphedStep:
    """The same step as one CUDA graph over static batch buffers [rows, seq]; model and AdamW on CUDA.

    Construction warms up and captures; the model and optimizer are left as they were (see the module
    docstring). Afterwards the parameters' .grad live in the graph's memory: do not set them to None."""

    def __init__(self, loss_fn: LossFn, model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float,
                 rows: int, seq: int, warmup: int = 3):
        device = next(model.parameters()).device
        self.x = torch.zeros(rows, seq, dtype=torch.long, device=device)
        self.y = torch.zeros(rows, seq, dtype=torch.long, device=device)
        # fused AdamW reads a tensor lr as float32 (a relative rounding of at most 6e-8 against the eager step)
        self.lr = torch.tensor(float(opt.param_groups[0]["lr"]), dtype=torch.float32, device=device)
        for g in opt.param_groups:
            g["lr"], g["capturable"] = self.lr, True
            for p in g["params"]:  # a state loaded from a CPU run keeps its step counters on the CPU
                state = opt.state.get(p)
                if state and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device, torch.float32)
        params = list(model.parameters())

        def body() -> tuple[torch.Tensor, torch.Tensor]:
            with _autocast(device, cache_enabled=False):  # autocast's weight-cast cache must not outlive capture
                loss, ce = loss_fn(self.x, self.y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            return loss, ce

        with unchanged_by(model, opt):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    opt.zero_grad(set_to_none=True)
                    body()
            torch.cuda.current_stream(device).wait_stream(side)
        opt.zero_grad(set_to_none=True)  # the capture's backward allocates .grad in the graph's own memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.ce = body()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(_pinned(x), non_blocking=True)
        self.y.copy_(_pinned(y), non_blocking=True)
        self.lr.fill_(lr)
        self.graph.replay()
        return self.loss, self.ce


@contextmanager
def unchanged_by(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[None]:
    """Whatever runs inside leaves the parameters, buffers, optimizer state and CPU/CUDA RNG states as they were.

    Optimizer state created inside (AdamW creates its state at its first step) is reset to its initial value,
    zeros (step 0, both moments 0), and kept, so that a graph can be captured over it."""
    device = next(model.parameters()).device
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    saved_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(tensors, saved):
                t.copy_(v)
            for p, s in opt.state.items():
                before = saved_state.get(p)
                for k, v in s.items():
                    if not torch.is_tensor(v):
                        raise TypeError(f"optimizer state {k!r} is not a tensor; cannot reset it")
                    if before is None:
                        v.zero_()
                    else:
                        v.copy_(before[k])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def portable_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() as the eager step writes it (lr a float, capturable off): a checkpoint of a graphed run
    resumes in eager mode and the other way round (GraphedStep sets both again on the optimizer it is given)."""
    state = opt.state_dict()  # fresh dicts for the groups: editing them leaves the optimizer alone
    for g in state["param_groups"]:
        if torch.is_tensor(g["lr"]):
            g["lr"] = g["lr"].item()
        g["capturable"] = False
    return state
