"""Linear layers on a CPU through oneDNN, with the weight laid out for it once instead of at every call.

Why: on a CPU, `F.linear` in float32 calls MKL's sgemm, and MKL takes a generic code path on CPUs that are not
Intel's. On this AMD EPYC a GEMM of a decoding step (5 rows) ran 2 to 3 times slower there than in oneDNN's
kernels, which are compiled for the CPU they run on (docs/serving.md, *oneDNN linear layers*): the lm_head
(256 → 4096) took 267 µs for 5 rows against 88 µs, 527 against 209 µs for 16 rows, and the MLP's gate and up
projections 102 against 51 µs. Both compute in float32; only the order of the additions differs.

oneDNN reads the weight in a blocked layout of its own (`mkldnn::_reorder_linear_weight`); reordering it at every
call would cost more than the GEMM, so it is done once and kept beside the weight (twice the weights' memory), and
done again whenever one of the weight's sources has changed: in place, as load_state_dict, nn.init and torch's
default optimizers do (their version counters), or given new memory. Writes that bump no version counter (through
`.data`, or a fused optimizer) need `reset()`. Elsewhere it is `F.linear`: a GPU, another dtype, autocast (which
does not reach oneDNN's op), a call that records gradients, inference tensors, `torch.backends.mkldnn` turned off
or a torch built without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Whether linear layers may run on oneDNN: this torch has it (benchmarks/decoder.py turns it off to compare).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear:
    """x Wᵀ + b. `sources`: the tensors `weight` was built from (itself by default), whose changes make the
    laid-out copy stale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 sources: list[torch.Tensor] | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.sources = sources if sources is not None else [weight]
        self.reset()

    def reset(self) -> None:
        """Forget the laid-out weight: the next call lays it out again."""
        self._laid_out: torch.Tensor | None = None
        # The sources it was laid out from, with their addresses and versions; holding them keeps their memory from
        # being reused by a new tensor at the same address.
        self._laid_out_from: list[tuple[torch.Tensor, int, int]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn_for(x):
            return torch.ops.mkldnn._linear_pointwise(x, self._laid_out, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _onednn_for(self, x: torch.Tensor) -> bool:
        """Whether this call runs on oneDNN, with the weight laid out for it (again, if a source changed). What
        concerns only the weights is checked when they are laid out, not at every call: a decoding step makes 17
        calls, and checking each of a packed layer's dozen sources every time was 2 % of the engine thread's time
        at concurrency 16 (py-spy)."""
        if not (ONEDNN and torch.backends.mkldnn.enabled and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")):
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)):
            return False
        if self._laid_out is None or not self._up_to_date():
            if not self._weights_fit():
                return False
            self._laid_out = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._laid_out_from = [(source.detach(), source.data_ptr(), source._version) for source in self.sources]
        return True

    def _up_to_date(self) -> bool:
        return len(self._laid_out_from) == len(self.sources) and all(
            source.data_ptr() == address and source._version == version
            for source, (_, address, version) in zip(self.sources, self._laid_out_from, strict=True))

    def _weights_fit(self) -> bool:
        weights = [t for t in (self.weight, self.bias) if t is not None]
        return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in weights)
                and not any(source.is_inference() for source in self.sources))

    def __getstate__(self) -> dict:
        """Copies and pickles leave the laid-out weight behind (an opaque oneDNN tensor cannot be copied)."""
        return {**self.__dict__, "_laid_out": None, "_laid_out_from": []}


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters and state dict) whose calls that record no gradients run through
    OneDNNLinear on a CPU: for the models' inference (our speech encoder, the projector, the LID and CTC heads)."""

    _onednn: OneDNNLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn is None or self._onednn.weight is not self.weight or self._onednn.bias is not self.bias:
            self._onednn = OneDNNLinear(self.weight, self.bias)
        return self._onednn(x)
