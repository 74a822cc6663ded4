"""Linear layers on a CPU through oneDNN, with the weight laid out for it once instead of at every call.

Why: on a CPU, `F.linear` in float32 calls MKL's sgemm, and MKL takes a generic code path on CPUs that are not
Intel's. On this AMD EPYC a GEMM of a decoding step (5 rows) ran 2 to 3 times slower there than in oneDNN's
kernels, which are compiled for the CPU they run on (docs/serving.md, *oneDNN linear layers*): the lm_head
(256 → 4096) took 267 µs for 5 rows against 88 µs, 527 against 209 µs for 16 rows, and the MLP's gate and up
projections 102 against 51 µs. Both compute in float32; only the order of the additions differs.

oneDNN reads the weight in a blocked layout of its own (`mkldnn::_reorder_linear_weight`); reordering it at every
call would cost more than the GEMM, so it is done once, and again whenever one of the weight's sources has changed
(in place, as an optimizer step or load_state_dict do: their version counters; or given new memory). Elsewhere
(a GPU, another dtype, a call that records gradients, a torch built without oneDNN) it is `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Whether linear layers may run on oneDNN: this torch has it (benchmarks/decoder.py turns it off to compare).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear:
    """x Wᵀ + b. `sources`: the tensors `weight` was built from (itself by default), whose in-place changes make
    the laid-out copy stale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 sources: list[torch.Tensor] | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.sources = sources if sources is not None else [weight]
        self._laid_out: torch.Tensor | None = None
        self._laid_out_from: list[tuple[int, int]] = []  # the sources' memory and versions it was laid out from

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._runs_on_onednn(x):
            return F.linear(x, self.weight, self.bias)
        sources = [(source.data_ptr(), source._version) for source in self.sources]
        if self._laid_out is None or sources != self._laid_out_from:
            self._laid_out = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._laid_out_from = sources
        return torch.ops.mkldnn._linear_pointwise(x, self._laid_out, self.bias, "none", [], "")

    def _runs_on_onednn(self, x: torch.Tensor) -> bool:
        tensors = [t for t in (x, self.weight, self.bias) if t is not None]
        return (ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters and state dict) whose calls that record no gradients run through
    OneDNNLinear on a CPU: for the models' inference (the speech encoder, the projector, the LID head)."""

    _onednn: OneDNNLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn is None or self._onednn.weight is not self.weight or self._onednn.bias is not self.bias:
            self._onednn = OneDNNLinear(self.weight, self.bias)
        return self._onednn(x)
