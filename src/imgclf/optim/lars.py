"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, arXiv:1708.03888).

Each parameter tensor ``w`` with gradient ``g`` and weight decay ``wd`` gets a
local learning rate (the paper's eq. 6 with its trust coefficient left out, as
the reference README does; base_lr absorbs it, hence 0.02 at batch 4096 there):

    local_lr = ||w|| / (||g|| + wd * ||w|| + eps)

and the update is momentum SGD on the decayed gradient scaled by it:

    v <- momentum * v + lr * local_lr * (g + wd * w)
    w <- w - v

Conventions chosen here (each differs from some published variant, hence the notes):

* ``local_lr = 1`` (plain momentum SGD) for a tensor whose WEIGHT norm is below
  ``threshold``. The ratio is degenerate near ``||w|| = 0``: a tensor that starts
  at zero (every bias and BN shift at init) would get ``local_lr ~ 0`` and never
  move. The gradient norm is NOT thresholded: late in training a converged
  conv weight can have ``||g|| < threshold``, and switching it to
  ``local_lr = 1`` there would drop its rate by orders of magnitude in one step.
  A gradient that is exactly zero also gets ``local_lr = 1``; otherwise the
  ratio becomes ``1 / wd`` and a tensor the loss does not use would shrink by a
  factor ``(1 - lr)`` per step instead of ``(1 - lr * wd)``.
  Deviation from the reference (LARS on a tensor whose gradient is exactly zero): the
  reference does not guard this case; no table row trains a tensor the loss ignores.
* The global ``lr`` sits inside the momentum buffer with the local lr, as in
  the reference implementation whose LARS rows the tables reproduce (and the
  paper's Algorithm 1). ``torch.optim.SGD`` multiplies the buffer instead; the
  two agree while the lr is constant and differ by the lr's change over the
  buffer's memory (~10 steps) when a schedule moves it.
* Heavy-ball momentum only (the paper's Algorithm 1); ``train.nesterov`` is an
  SGD option.

The step is vectorised over tensors with ``torch._foreach_*`` ops and never
reads a value back to the host, so it does not synchronise a GPU.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        threshold: float = 1e-2,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if eps <= 0:
            raise ValueError(f"LARS: eps must be > 0, got {eps}")
        if threshold < 0:
            raise ValueError(f"LARS: threshold must be >= 0, got {threshold}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, threshold=threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device and dtype per list
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]

        # Norms in fp32 even for fp16/bf16 parameters (pure-fp16 training).
        w_norm = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
        g_norm = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        ratio = w_norm / (g_norm + wd * w_norm + group["eps"])
        trusted = (w_norm >= group["threshold"]) & (g_norm > 0)
        local_lr = torch.where(trusted, ratio, torch.ones_like(ratio)).to(params[0].dtype)

        # Decay is added to the gradient before momentum (L2, as in the paper),
        # into a new list: p.grad is left as the engine computed it.
        d_p = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
        d_p = torch._foreach_mul(d_p, list((lr * local_lr).unbind(0)))

        if momentum == 0:
            torch._foreach_sub_(params, d_p)
            return
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # zero start: the first step's buffer is the scaled gradient itself
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d_p)
        torch._foreach_sub_(params, bufs)
