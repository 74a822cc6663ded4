"""Linear layers on a CPU through oneDNN, with the weight laid out for it once instead of at every call.

Why: on a CPU, `F.linear` in float32 calls MKL's sgemm, and MKL takes a generic code path on CPUs that are not
Intel's. On this AMD EPYC a GEMM of a decoding step (5 rows) ran 2 to 3 times slower there than in oneDNN's
kernels, which are compiled for the CPU they run on (docs/serving.md, *oneDNN linear layers*): the lm_head
(256 → 4096) took 267 µs for 5 rows against 88 µs, 527 against 209 µs for 16 rows, and the MLP's gate and up
projections 102 against 51 µs. Both compute in float32; only the order of the additions differs.

oneDNN reads the weight in a blocked layout of its own (`mkldnn::_reorder_linear_weight`); reordering it at every
call would cost more than the GEMM, so it is done once and kept beside the weight (twice the weights' memory; a
layer with a `wide_gemm_dtype` keeps a third copy, in bf16), and
done again whenever one of the weight's sources has changed: in place, as load_state_dict, nn.init and torch's
default optimizers do (their version counters), or given new memory. Writes that bump no version counter (through
`.data`, or a fused optimizer) need `reset()`. Elsewhere it is `F.linear`: a GPU, another dtype, autocast (which
does not reach oneDNN's op), a call that records gradients, inference tensors, `torch.backends.mkldnn` turned off
or a torch built without it.

A layer's GEMM may run in bfloat16 (`gemm_dtype`; `set_gemm_dtype` for a module's layers): the weight is laid out
in bf16, each call's input is rounded to bf16, oneDNN accumulates in float32, adds the float32 bias and rounds the
output to bf16, which comes back as float32; everything between the linear layers (norms, attention, the residual
stream) stays float32. On a CPU with bf16 instructions (AVX512-BF16, AMX) a GEMM of the speech encoder's size runs
about 1.8x faster than in float32 (docs/serving.md, *bf16 GEMMs*, with what it costs in accuracy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Whether linear layers may run on oneDNN: this torch has it (benchmarks/decoder.py turns it off to compare).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
GEMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GEMM_DTYPE_CHOICES = (*GEMM_DTYPES, "auto")  # what a setting may say: resolve_gemm_dtype


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16, slowly and for
    nothing (torch's `_is_mkldnn_bf16_supported` says yes to any AVX-512 CPU)."""
    return ONEDNN and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_gemm_dtype(name: str) -> torch.dtype:
    """A name of GEMM_DTYPES, or `auto`: bfloat16 where the CPU has bf16 instructions, else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in GEMM_DTYPES:
        raise ValueError(f"unknown GEMM dtype {name!r}: {', '.join(GEMM_DTYPES)} or auto")
    return GEMM_DTYPES[name]


def gemm_dtype_name(dtype: torch.dtype) -> str:
    """The GEMM_DTYPES name of a dtype, as settings and reports write it."""
    return next(name for name, known in GEMM_DTYPES.items() if known == checked_gemm_dtype(dtype))


def checked_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in GEMM_DTYPES.values():
        raise ValueError(f"GEMMs run in float32 or bfloat16, not {dtype}")
    return dtype


def set_gemm_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """The GEMMs of every `Linear` in `module` run in `dtype` (float32 or bfloat16) from their next call on (a module
    of other linear layers, a Hugging Face encoder's, has none)."""
    checked_gemm_dtype(dtype)
    for layer in module.modules():
        if isinstance(layer, Linear):
            layer.gemm_dtype = dtype


EXACT_ROWS = 16  # calls of up to this many rows (a decoding step's) run as they are
BUCKET_BITS = 3  # 2**3 = 8 row counts per octave above that


def padded_rows(rows: int) -> int:
    """How many rows a call of `rows` runs with: up to EXACT_ROWS as many, above that rounded up to one of
    2**BUCKET_BITS sizes per octave (at most 1/8 more rows; the extra rows are zeros, and their outputs are dropped).
    oneDNN makes a primitive for every input shape a layer is called with, JIT-compiled kernels included, and keeps
    it (PyTorch's ideep cache and oneDNN's own, 1024 primitives each): about 0.6 MB each for the decoder's layers. A
    server sees prompts and audio of every length, so its process grew with each new one, from 564 MB at start to
    1.27 GB over 11 minutes of the serving benchmark's load (docs/serving.md, *Memory: oneDNN's primitives*). Smaller
    caches would bound it too, but a length that fell out of them compiles its kernels again (7 % slower)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 1 - BUCKET_BITS)  # rows in [2**k, 2**(k+1)) go up by 2**(k-3)
    return -(-rows // step) * step


class OneDNNLinear:
    """x Wᵀ + b. `sources`: the tensors `weight` was built from (itself by default), whose changes make the
    laid-out copy stale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 sources: list[torch.Tensor] | None = None, gemm_dtype: torch.dtype = torch.float32) -> None:
        self.weight, self.bias = weight, bias
        self.gemm_dtype = checked_gemm_dtype(gemm_dtype)  # set again only through checked_gemm_dtype
        # A bf16 GEMM's output as it comes (bf16), not made float32 again: for a layer whose output goes only to
        # another bf16 GEMM, through elementwise ops that compute in float32 and round to bf16 as that GEMM's input
        # would be rounded (Linear.output_in_gemm_dtype). Its input may then be bf16 too.
        self.output_in_gemm_dtype = False
        # Calls of more than EXACT_ROWS rows (a decoder's prompts; a plain decoding step has fewer) run their GEMM in
        # this dtype, read at every call; None: in gemm_dtype. bf16 pays from about 16 rows on (1.26x at 16 rows,
        # 1.7x at 140 on this CPU), not below. Set it to a GEMM_DTYPES value (LlamaDecoder.set_gemm_dtype checks).
        self.wide_gemm_dtype: torch.dtype | None = None
        self.sources = sources if sources is not None else [weight]
        self.reset()

    def reset(self) -> None:
        """Forget the laid-out weight: the next call lays it out again."""
        self._laid_out: torch.Tensor | None = None
        # The sources it was laid out from, with their addresses and versions; holding them keeps their memory from
        # being reused by a new tensor at the same address.
        self._laid_out_from: list[tuple[torch.Tensor, int, int]] = []
        self._last_choice: torch.Tensor | None = None  # what the last checked call ran with (None: F.linear)
        self._wide: torch.Tensor | None = None  # the weight laid out in wide_gemm_dtype (dropped with `_laid_out`)

    def __call__(self, x: torch.Tensor, checked: bool = True) -> torch.Tensor:
        """`checked` False: run as the last checked call did, without checking the input or the weights again, for
        calls that a checked one vouches for (a generation's decoding steps: speechllm.decoder.LlamaDecoder). The
        checks cost 3 to 4 µs a call; skipping them in the steps made a decoding step of the shipped model faster:
        1.70 → 1.54 ms for 1 row, 2.39 → 2.24 ms for 6, 4.01 → 3.89 ms for 16 (docs/serving.md)."""
        if checked:
            self._last_choice = self._laid_out_for(x)
        laid_out = self._last_choice
        if laid_out is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if rows > EXACT_ROWS and self.wide_gemm_dtype not in (None, laid_out.dtype):
            laid_out = self._wide_laid_out()
        padded = padded_rows(rows)
        if padded != rows:
            zero_padded = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
            return self._gemm(zero_padded, laid_out)[:rows].view(*x.shape[:-1], -1)
        return self._gemm(x, laid_out)

    def _gemm(self, x: torch.Tensor, laid_out: torch.Tensor) -> torch.Tensor:
        if laid_out.dtype is torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, laid_out, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.to(laid_out.dtype), laid_out, self.bias, "none", [], "")
        return y if self.output_in_gemm_dtype else y.float()

    def _wide_laid_out(self) -> torch.Tensor:
        """The weight laid out in wide_gemm_dtype; `_laid_out_for` and `reset` drop it with gemm_dtype's."""
        if self._wide is None or self._wide.dtype != self.wide_gemm_dtype:
            self._wide = None  # (not held while the new one is made)
            self._wide = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(self.wide_gemm_dtype))
        return self._wide

    def _laid_out_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weight laid out for oneDNN in `gemm_dtype` (again, if a source changed), or None where this call
        runs F.linear. What concerns only the weights is checked when they are laid out, not at every call: a
        decoding step makes 17 calls, and checking each of a packed layer's dozen sources every time was 2 % of the
        engine thread's time at concurrency 16 (py-spy)."""
        if not (ONEDNN and torch.backends.mkldnn.enabled and x.device.type == "cpu"
                and x.dtype in (torch.float32, self.gemm_dtype) and not torch.is_autocast_enabled("cpu")):
            return None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)):
            return None
        laid_out = self._laid_out
        if laid_out is None or laid_out.dtype is not self.gemm_dtype or not self._up_to_date():
            if not self._weights_fit():
                return None
            self._wide = None  # laid out from the old weights
            laid_out = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(self.gemm_dtype))
            self._laid_out = laid_out
            self._laid_out_from = [(source.detach(), source.data_ptr(), source._version) for source in self.sources]
        return laid_out

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
        return {**self.__dict__, "_laid_out": None, "_laid_out_from": [], "_last_choice": None, "_wide": None}


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters and state dict) whose calls that record no gradients run through
    OneDNNLinear on a CPU: for the models' inference (our speech encoder, the projector, the LID and CTC heads)."""

    _onednn: OneDNNLinear | None = None
    gemm_dtype = torch.float32  # set_gemm_dtype
    # A bf16 GEMM's output left in bf16 (OneDNNLinear.output_in_gemm_dtype): set for a layer whose output goes only
    # to another Linear of the same gemm_dtype through ops that round as that layer would (the encoder's GELU).
    output_in_gemm_dtype = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn is None or self._onednn.weight is not self.weight or self._onednn.bias is not self.bias:
            self._onednn = OneDNNLinear(self.weight, self.bias)
        self._onednn.gemm_dtype = self.gemm_dtype
        self._onednn.output_in_gemm_dtype = self.output_in_gemm_dtype
        return self._onednn(x)
