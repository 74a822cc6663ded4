"""The decoder LLM's forward pass for generation: prefill the prompts, then one token per step, with a KV cache.

`LlamaDecoder` runs the Hugging Face model's own modules and weights in a short loop of its own, as vLLM's model
implementations do. Hugging Face's forward is written for every use: each call builds masks and cache objects and
threads keyword arguments through every layer. Our decoder is 4 layers of width 256, and at that size the
bookkeeping costs as much as the arithmetic. The loop here also packs the projections that read the same input
(q, k, v; gate, up) into one GEMM each, together with their Zipper adapters' shared A (`PackedLinear`: the
modules' weights become views into the packed tensor, so the model's memory is not doubled), prefills rows of
similar prompt length together, and runs a prefill's last layer, past the keys and values the cache needs from every
input, on each row's last input alone (the only one whose output reaches a logit). It serves Llama-style decoders
(Llama, Qwen2): RMSNorm, rotary positions, grouped-query attention, SwiGLU.
`HFDecoder` runs any other causal LM through Hugging Face's forward; `decoder_for` picks one.

Both keep the batch's rows in the KV cache's first dimension; rows that leave the batch (see
speechllm.decoding.generate) leave the cache through `keep`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, PreTrainedModel

from adapters.zipper import ZipperLinear, move_rows, room_rows, row_moves, use_rows
from speechllm.cpu_linear import OneDNNLinear, checked_gemm_dtype
from speechllm.padding import length_groups


class DecoderState(Protocol):
    def keep(self, rows: torch.Tensor) -> None:
        """Only the rows at positions `rows` of the batch stay."""


class Decoder(Protocol):
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int
                ) -> tuple[torch.Tensor, DecoderState]:
        """Left-padded prompt embeddings (B, L, D) with their mask (B, L) → the next token's logits (B, V)
        and the state for `step`, with room for `max_new_tokens` more tokens."""

    def step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Each row's next token (B,) → the logits of the token after it (B, V)."""

    # LlamaDecoder also merges two batches' states (`join`: continuous batching) and runs a step and a prefill in
    # one forward pass (`can_mix`, `step_and_prefill`); speechllm.decoding.Generation uses them when they are there.


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each input's position, counted from its row's first real input: left padding changes nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---- Hugging Face's forward, for any causal LM ---------------------------------------------------------
@dataclass
class HFState:
    cache: Cache
    mask: torch.Tensor  # (B, length): 0 for left padding
    positions: torch.Tensor  # (B, 1): the position of each row's last input

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.positions = self.mask[rows], self.positions[rows]


class HFDecoder:
    def __init__(self, llm: PreTrainedModel) -> None:
        self.llm = llm

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, HFState]:
        positions = prompt_positions(mask)
        outputs = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1)
        return outputs.logits[:, -1], HFState(outputs.cache, mask, positions[:, -1:])

    def step(self, tokens: torch.Tensor, state: HFState) -> torch.Tensor:
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], dim=1)
        state.positions = state.positions + 1
        outputs = self.llm(input_ids=tokens[:, None], attention_mask=state.mask, position_ids=state.positions,
                           cache=state.cache, use_cache=True)
        return outputs.logits[:, -1]


# ---- our own loop, for Llama-style decoders ------------------------------------------------------------
class PackedLinear:
    """Linear layers that read the same input, run as one GEMM over their stacked weights.

    When they are Zipper layers serving a batch with a shared A (adapters.zipper.use_segments), each layer's
    A is stacked below the base weights too, so the same GEMM gives W0 x and A x, and only each layer's
    per-row B step remains. Otherwise (training's per-row languages, the independent baseline) each layer runs
    as its own module. The GEMM runs through oneDNN on a CPU (speechllm.cpu_linear). The weights are packed once,
    at construction, and each module's weight becomes a view into the packed tensor: changes made in place (an
    optimizer step, load_state_dict) reach both, while a module given a new tensor (moved to another device, say)
    needs a new PackedLinear."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.zipper = all(isinstance(layer, ZipperLinear) for layer in layers)
        bases = [layer.base if self.zipper else layer for layer in layers]
        weights = [base.weight for base in bases]
        biases = [base.bias if base.bias is not None else base.weight.new_zeros(len(base.weight)) for base in bases]
        self.shared_a = self.zipper and all(layer.lora_A.dim() == 2 for layer in layers)
        if self.shared_a:
            weights += [layer.lora_A for layer in layers]
            biases += [layer.lora_A.new_zeros(len(layer.lora_A)) for layer in layers]
        self.weight = torch.cat(weights).detach()
        self.bias = torch.cat(biases).detach()
        self.sizes = [len(w) for w in weights]
        self.linear = OneDNNLinear(self.weight, self.bias,
                                   sources=[t for t in weights + biases if isinstance(t, nn.Parameter)])
        for tensors, packed in ((weights, self.weight), (biases, self.bias)):
            for tensor, view in zip(tensors, packed.split(self.sizes), strict=True):
                # not the zeros standing in for a missing bias, nor a tensor torch.cat had to convert
                if isinstance(tensor, nn.Parameter) and (tensor.dtype, tensor.device) == (view.dtype, view.device):
                    tensor.data = view
        self._ran_as_one_gemm = False  # how the last checked call ran (see __call__)

    @property
    def one_gemm(self) -> bool:
        """Whether the layers run as one GEMM now (otherwise each runs as its own module)."""
        return not self.zipper or (self.shared_a and all(layer.rows is not None for layer in self.layers))

    def __call__(self, x: torch.Tensor, parts: list[Part] | None = None, checked: bool = True) -> list[torch.Tensor]:
        """Each layer's output for x: (b, T, in); or, for a pass over several `parts`, their inputs one after the
        other (N, in). `checked` False: run as the last checked call did (OneDNNLinear.__call__)."""
        if checked:
            self._ran_as_one_gemm = self.one_gemm
        if not self._ran_as_one_gemm:
            if parts is not None and len(parts) > 1:
                raise ValueError("a pass over several parts needs the layers as one GEMM (LlamaDecoder.can_mix)")
            return [layer(x) for layer in self.layers]
        outputs = self.linear(x, checked).split(self.sizes, -1)
        if not self.zipper:
            return list(outputs)
        n = len(self.layers)
        if parts is None or len(parts) == 1:
            return [layer.rows.add_update(y, ax, layer.config.scaling)
                    for layer, y, ax in zip(self.layers, outputs[:n], outputs[n:], strict=True)]
        # each part's rows of the GEMM's output with their own adapters
        return [torch.cat([layer.rows.select(part.adapter_rows).add_update(part.of(y), part.of(ax),
                                                                             layer.config.scaling).flatten(0, 1)
                           for part in parts])
                for layer, y, ax in zip(self.layers, outputs[:n], outputs[n:], strict=True)]


# Slots a batch's cache keeps beyond its rows' remaining steps, so that rows joining later (with as many steps to go
# as the first rows had) can be written into it in place (KVCache.join) for this many steps after it was made.
SLOT_HEADROOM = 64


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer (B, kv_heads, capacity, head_dim)
    values: list[torch.Tensor]
    valid: torch.Tensor  # (B, capacity): False for left padding and for slots not yet written
    positions: torch.Tensor  # (B,): the position of each row's last input
    length: int = 0  # slots written
    # Per layer, keys and values with room for more rows, whose first B rows are `keys` and `values` (None: no
    # room): rows that join are written after them, and the running rows' cache is not copied (join).
    room_keys: list[torch.Tensor] | None = None
    room_values: list[torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` stay, in that order; slots that none of them uses any more (before the oldest one's first)
        are dropped, so that a batch that rows keep joining (KVCache.join) does not grow without end. What stays
        keeps room for rows to join. A cache with room keeps them in it: only the rows that change position are
        copied (Generation keeps the others where they are), and the dropped slots leave its view, not its memory,
        which a join that does not fit gives back. Copying every row that stays into a new cache took 0.38 ms a keep
        in the engine (9 rows a step), and the adapters' rows (RowsRoom.keep) 0.36 ms more; in place 0.19 and 0.23."""
        first = int(self.valid[rows, : self.length].any(0).int().argmax()) if self.length else 0
        if self.room_keys is None:  # a prefill's cache
            self.room_keys = [_kept_slots(x, rows, first, self.length) for x in self.keys]
            self.room_values = [_kept_slots(x, rows, first, self.length) for x in self.values]
        else:
            moves = row_moves(rows)
            for x in self.room_keys + self.room_values:
                move_rows(x.narrow(2, first, self.length - first), moves)
            self.room_keys = [x.narrow(2, first, x.shape[2] - first) for x in self.room_keys]
            self.room_values = [x.narrow(2, first, x.shape[2] - first) for x in self.room_values]
        self.keys, self.values = [x[: len(rows)] for x in self.room_keys], [x[: len(rows)] for x in self.room_values]
        self.valid, self.positions = self.valid[rows, first:], self.positions[rows]
        self.length -= first

    @staticmethod
    def join(a: KVCache, b: KVCache) -> KVCache:
        """The rows of `a` and then those of `b` as one batch: both right-aligned on the longer one's written
        slots (the shorter one's rows get padding slots before theirs), with room for the longer of the two's
        remaining steps. `b`'s rows are written into `a`'s room when they fit (`fits`); otherwise both are copied
        into a cache with room for more rows and SLOT_HEADROOM more slots than `b`'s remaining steps (not `a`'s:
        its own may hold the headroom of an earlier join already). `a` is used up: the joined cache may share its
        memory."""
        if a.fits(b):
            return a._joined_in_place(b)
        length = max(a.length, b.length)
        capacity = length + max(a.capacity - a.length, b.capacity - b.length + SLOT_HEADROOM)
        rows = len(a.positions) + len(b.positions)

        def joined(x: torch.Tensor, y: torch.Tensor, slot_dim: int, room: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[0], shape[slot_dim] = room, capacity
            out = empty_slots(x, shape, slot_dim, 0)
            for start, source, written in ((0, x, a.length), (len(a.positions), y, b.length)):
                rows_of_source = out[start: start + len(source)]
                rows_of_source.narrow(slot_dim, 0, length - written).zero_()  # padding before its written slots
                rows_of_source.narrow(slot_dim, length - written, written).copy_(source.narrow(slot_dim, 0, written))
            return out

        room_keys = [joined(x, y, 2, room_rows(rows)) for x, y in zip(a.keys, b.keys, strict=True)]
        room_values = [joined(x, y, 2, room_rows(rows)) for x, y in zip(a.values, b.values, strict=True)]
        return KVCache([x[:rows] for x in room_keys], [x[:rows] for x in room_values],
                       joined(a.valid, b.valid, 1, rows), torch.cat([a.positions, b.positions]), length, room_keys,
                       room_values)

    def fits(self, joining: KVCache) -> bool:
        """Whether `joining`'s rows can be written into this cache's room: enough rows, and slots for their
        written ones before this cache's length and for their remaining steps after it."""
        rows = len(self.positions) + len(joining.positions)
        return (self.room_keys is not None and rows <= len(self.room_keys[0]) and joining.length <= self.length
                and joining.capacity - joining.length <= self.capacity - self.length)

    def _joined_in_place(self, joining: KVCache) -> KVCache:
        start, end = len(self.positions), len(self.positions) + len(joining.positions)
        padding = self.length - joining.length  # slots before the joining rows' first
        for room, source in zip(self.room_keys + self.room_values, joining.keys + joining.values, strict=True):
            rows = room[start:end]
            rows[:, :, :padding].zero_()
            rows[:, :, padding: self.length].copy_(source[:, :, : joining.length])
        valid = self.valid.new_zeros(end - start, self.capacity)
        valid[:, padding: self.length] = joining.valid[:, : joining.length]
        return KVCache([x[:end] for x in self.room_keys], [x[:end] for x in self.room_values],
                       torch.cat([self.valid, valid]), torch.cat([self.positions, joining.positions]), self.length,
                       self.room_keys, self.room_values)


def _kept_slots(x: torch.Tensor, rows: torch.Tensor, first: int, length: int) -> torch.Tensor:
    """A cache tensor's rows `rows` and slots from `first` on, with room for more rows (room_rows); of its slots
    only the written ones, [first, length), are copied (empty_slots: the others are written before they are read).
    `index_select` gathers the rows 2.3 times as fast as indexing with `rows` (30 against 69 µs for 10 of 13 rows of
    70 slots: a keep copies 8 such tensors)."""
    out = x.new_empty(room_rows(len(rows)), x.shape[1], x.shape[2] - first, *x.shape[3:])
    out[: len(rows), :, : length - first] = x.narrow(2, first, length - first).index_select(0, rows)
    return out


@dataclass
class Part:
    """Rows of a forward pass with as many inputs each: a decoding step's rows (one input each) or a group of
    prompts prefilled together. A pass over several parts (LlamaDecoder.step_and_prefill) reads the weights once
    for all of them: the parts' inputs go through the linear layers as one (N, D) matrix, one after the other,
    and each part attends to its own cache slots with its own rows' adapters."""

    x: torch.Tensor  # (b, T, D)
    positions: torch.Tensor  # (b, T)
    cache: KVCache
    cache_rows: torch.Tensor | None  # which of the cache's rows (None: all of them)
    start: int  # the inputs are written to the cache's slots [start, start + T)
    adapter_rows: torch.Tensor | slice | None = None  # which rows of the Zipper layers' batch (None: all)
    offset: int = 0  # where its inputs begin in a pass over several parts

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """This part's rows of a pass's (N, ...) tensor, as (b, T, ...)."""
        batch, length = self.x.shape[:2]
        return flat[self.offset: self.offset + batch * length].unflatten(0, (batch, length))

    def attention_mask(self) -> torch.Tensor:
        """Which cache slots each input attends to (b, 1, T, keys). A prefill group (`cache_rows` given) attends
        only to its own slots, since the slots before them are padding for its rows; every row of the batch
        (`cache_rows` None: a step, or a prefill in one call) to every slot so far."""
        length = self.x.shape[1]
        end = self.start + length
        first = 0 if self.cache_rows is None else self.start
        valid = self.cache.valid if self.cache_rows is None else self.cache.valid[self.cache_rows]
        attend = valid[:, None, None, first:end]  # (b, 1, 1, keys)
        if length > 1:  # causal, and every query sees itself so that a padding row is never empty
            keys = torch.arange(first, end, device=valid.device)
            queries = torch.arange(self.start, end, device=valid.device)[:, None]
            attend = (attend & (keys <= queries)) | (keys == queries)
        return attend


def empty_slots(like: torch.Tensor, shape: list[int], slot_dim: int, zeroed: int) -> torch.Tensor:
    """A cache tensor with slots [0, zeroed) set to zero and the later ones unset, for keys and values (masks are
    all False): a slot is read only once a step or prefill wrote it, or as padding before a row's first slot,
    which must be zero, not unset, since a masked slot still enters attention's arithmetic and NaN there (0 × NaN)
    would spoil the row. Filling the whole cache with zeros at every join was 5 % of the engine thread's time at
    concurrency 16 (py-spy), most of it the first touch of freshly allocated pages."""
    if like.dtype == torch.bool:
        return like.new_zeros(shape)
    out = like.new_empty(shape)
    out.narrow(slot_dim, 0, zeroed).zero_()
    return out


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as torch's one fused op (Hugging Face's runs five)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class RotaryTable:
    """The decoder's rotary position embedding as a table, as vLLM keeps it: cos and sin of every position are
    computed once, by the model's own rotary module (so they are the values it computes), and looked up by each
    forward pass. The sin table carries rotate_half's signs, so a rotation is x·cos + roll(x)·sin: four ops where
    Hugging Face's rotate_half takes seven (slices, a negation, a concatenation), and bit for bit the same result.
    Together they were about a sixth of a decoding step (0.35 of 2.26 ms for 5 rows)."""

    # Rotary types whose cos and sin of a position do not depend on the other positions of the call (dynamic and
    # longrope rescale by the longest one): only these can be tabulated; models with others go to HFDecoder.
    TABULAR = ("default", "linear", "llama3", "yarn")

    def __init__(self, rotary: nn.Module, head_dim: int, like: torch.Tensor, positions: int) -> None:
        self.rotary, self.half = rotary, head_dim // 2
        self.sign = torch.cat([-like.new_ones(self.half), like.new_ones(head_dim - self.half)])
        self.cos = self.sin = like.new_empty(0, head_dim)
        self.reserve(positions, like)

    def reserve(self, positions: int, like: torch.Tensor) -> None:
        """Room for positions [0, positions)."""
        if positions > len(self.cos):
            cos, sin = self.rotary(like, torch.arange(max(positions, 2 * len(self.cos)), device=like.device)[None])
            self.cos, self.sin = cos[0], sin[0] * self.sign

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T) positions → cos and signed sin (b, 1, T, head_dim), broadcasting over the heads."""
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.roll(self.half, -1) * sin


# One more prefill call costs about as much as prefilling this many more positions: on this CPU a call costs about
# 3 ms whatever its size, and a position about 0.1 ms in a batch of 16 (97 ms for 16 × 62 positions).
PREFILL_CALL_TOKENS = 32


class LlamaDecoder:
    """Llama-style decoders (Llama, Qwen2) through their own modules: see the module docstring."""

    ARCHITECTURES = ("llama", "qwen2")

    def __init__(self, llm: PreTrainedModel) -> None:
        if not self.supports(llm):
            raise ValueError(f"{llm.config.model_type} is not a Llama-style decoder: use HFDecoder")
        config = llm.config
        self.llm = llm
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = list(llm.model.layers)
        self.qkv = [PackedLinear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in self.layers]
        self.o = [PackedLinear([layer.self_attn.o_proj]) for layer in self.layers]
        self.gate_up = [PackedLinear([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
        self.down = [PackedLinear([layer.mlp.down_proj]) for layer in self.layers]
        # Bound to the lm_head's weight now, as the packed layers are: a model given new weights needs a new decoder.
        self.lm_head = OneDNNLinear(llm.lm_head.weight, llm.lm_head.bias)
        self.rotary = RotaryTable(llm.model.rotary_emb, self.head_dim, llm.get_input_embeddings().weight,
                                  config.max_position_embeddings)

    def set_gemm_dtype(self, dtype: torch.dtype, wide: torch.dtype | None = None) -> None:
        """The packed layers' and the lm_head's GEMMs in `dtype` (speechllm.cpu_linear; a packed layer that runs as
        its own modules stays as they are), from the next generation on: a generation's steps run as its prefill did
        (`_forward`, `checked`). Those over more than EXACT_ROWS rows in `wide` (None: `dtype` too), from the next
        such call on: prefills, and passes that carry joining prompts (step_and_prefill), the running rows' step
        with them; a plain step of up to EXACT_ROWS rows runs in `dtype`."""
        checked_gemm_dtype(dtype)
        if wide is not None:
            checked_gemm_dtype(wide)
        for linear in [packed.linear for packed in self.qkv + self.o + self.gate_up + self.down] + [self.lm_head]:
            linear.gemm_dtype, linear.wide_gemm_dtype = dtype, wide

    @classmethod
    def supports(cls, llm: PreTrainedModel) -> bool:
        config = llm.config
        return (config.model_type in cls.ARCHITECTURES and config.hidden_act == "silu"
                and not getattr(config, "use_sliding_window", False)
                and getattr(llm.model.rotary_emb, "rope_type", "default") in RotaryTable.TABULAR)

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, KVCache]:
        """Rows of similar length are prefilled together (speechllm.padding): one long prompt in a batch would
        otherwise make every row compute its length. Each group writes its last slots of the cache, so that
        the batch continues as one, left-padded to the longest prompt."""
        cache, groups = self._prefill_parts(embeds, mask, max_new_tokens)
        if len(groups) == 1:  # one call for all rows: no rows to pick out of the batch, its cache or its adapters
            return self._forward(groups), cache
        logits = []
        for group in groups:
            with use_rows(self.llm, group.cache_rows):
                logits.append(self._forward([group]))
        return _in_row_order(groups, logits), cache

    def _prefill_parts(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                       first_adapter_row: int = 0) -> tuple[KVCache, list[Part]]:
        """A cache for left-padded prompts, with room for `max_new_tokens` more, and their length groups as the
        parts of a forward pass; their adapters are the Zipper batch's rows from `first_adapter_row` on."""
        batch, length, _ = embeds.shape
        capacity = length + max_new_tokens
        shape = [batch, self.n_kv_heads, capacity, self.head_dim]
        prompt_lengths = mask.sum(-1)
        lengths = prompt_lengths.tolist()
        groups = length_groups(lengths, PREFILL_CALL_TOKENS)
        # One group writes every slot of [0, length); several leave padding before each group's first slot.
        zeroed = 0 if len(groups) == 1 else length
        cache = KVCache([empty_slots(embeds, shape, 2, zeroed) for _ in self.layers],
                        [empty_slots(embeds, shape, 2, zeroed) for _ in self.layers],
                        torch.zeros(batch, capacity, dtype=torch.bool, device=embeds.device), prompt_lengths - 1,
                        length)
        cache.valid[:, :length] = mask.bool()
        if len(groups) == 1:
            return cache, [Part(embeds, prompt_positions(mask), cache, None, 0,
                                slice(first_adapter_row, first_adapter_row + batch))]
        parts = []
        for group in groups:
            rows = torch.tensor(group, device=embeds.device)
            start = length - max(lengths[row] for row in group)
            parts.append(Part(embeds[rows, start:], prompt_positions(mask[rows, start:]), cache, rows, start,
                              rows + first_adapter_row))
        return cache, parts

    def join(self, a: KVCache, b: KVCache) -> KVCache:
        """KVCache.join: `a` is used up."""
        return KVCache.join(a, b)

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        logits = self._forward([self._step_part(tokens, cache)], checked=False)
        cache.length += 1
        return logits

    def _step_part(self, tokens: torch.Tensor, cache: KVCache) -> Part:
        cache.valid[:, cache.length] = True
        cache.positions = cache.positions + 1
        return Part(self.llm.get_input_embeddings()(tokens[:, None]), cache.positions[:, None], cache, None,
                    cache.length, slice(0, len(tokens)))

    def can_mix(self) -> bool:
        """Whether `step_and_prefill` can run now: every packed projection is one GEMM (not so with per-language
        A matrices, the independent baseline, nor with adapters set per language index rather than per row)."""
        return all(packed.one_gemm for packed in self.qkv + self.o + self.gate_up + self.down)

    def step_and_prefill(self, tokens: torch.Tensor, cache: KVCache, embeds: torch.Tensor, mask: torch.Tensor,
                         max_new_tokens: int) -> tuple[torch.Tensor, KVCache]:
        """A step of the running rows (`tokens`, `cache`) and the prefill of rows joining them (left-padded
        prompts), in one forward pass: vLLM's mixed prefill and decode batches. Apart, the prefill would be a pass
        of its own, reading every weight and running every op once more, and at this decoder's size an op's fixed
        cost is most of a small step's time (docs/serving.md, *Mixed batches*). Returns the logits of the running
        rows and then of the joining rows, and the cache of them all (running rows first). The Zipper layers' batch
        holds the adapters of the running rows and then of the joining rows (adapters.zipper.joining_rows)."""
        step = self._step_part(tokens, cache)
        joining, groups = self._prefill_parts(embeds, mask, max_new_tokens, first_adapter_row=len(tokens))
        out = self._forward([step, *groups], checked=False)
        cache.length += 1
        joining_logits = _in_row_order(groups, list(out[len(tokens):].split([len(group.x) for group in groups])))
        return torch.cat([out[: len(tokens)], joining_logits]), KVCache.join(cache, joining)

    def _forward(self, parts: list[Part], checked: bool = True) -> torch.Tensor:
        """Inputs of one or more parts (see Part) → the logits of each part's rows' last input, part after part.
        One part keeps its (b, T, D) shape throughout; several go through the linear layers as one (N, D)
        matrix. `checked` False: the linear layers run as they did in the last checked pass, the prefill that began
        the generation (OneDNNLinear.__call__): a model's weights must not change while it decodes."""
        offset = 0
        for part in parts:
            self.rotary.reserve(part.start + part.x.shape[1], part.x)  # a row's positions never pass its slot
            part.offset = offset
            offset += part.x.shape[0] * part.x.shape[1]
        rotations = [self.rotary.lookup(part.positions) for part in parts]
        masks = [part.attention_mask() for part in parts]
        several = parts if len(parts) > 1 else None
        x = torch.cat([part.x.flatten(0, 1) for part in parts]) if several else parts[0].x
        for index, layer in enumerate(self.layers):
            # Only each row's last input reaches the logits: the last layer needs every input's keys and values (the
            # cache keeps them), and the rest of it, from the queries on, for the last inputs alone.
            if index == len(self.layers) - 1 and any(part.x.shape[1] > 1 for part in parts):
                last_parts = _last_inputs(parts)
                attended = self._attention(index, layer, x, parts, rotations, masks, checked, last_parts)
                x = torch.cat([part.of(x)[:, -1] for part in parts]) if several else x[:, -1:]
                parts, several = last_parts, last_parts if several else None
            else:
                attended = self._attention(index, layer, x, parts, rotations, masks, checked)
            x = x + attended
            hidden = _rms_norm(layer.post_attention_layernorm, x)
            gate, up = self.gate_up[index](hidden, several, checked)
            x = x + self.down[index](F.silu(gate) * up, several, checked)[0]
        last = torch.cat([part.of(x)[:, -1] for part in parts]) if several else x[:, -1]
        return self.lm_head(_rms_norm(self.llm.model.norm, last), checked)

    def _attention(self, index: int, layer: nn.Module, x: torch.Tensor, parts: list[Part],
                   rotations: list[tuple[torch.Tensor, torch.Tensor]], masks: list[torch.Tensor], checked: bool,
                   last_parts: list[Part] | None = None) -> torch.Tensor:
        """The attention block's output for every input of `parts` (x: their inputs), or, given `last_parts`
        (`_last_inputs(parts)`), for each part's last input alone; every input's keys and values go to the cache."""
        several = parts if len(parts) > 1 else None  # (None keeps the one part's (b, T, D) shape throughout)
        q, k, v = self.qkv[index](_rms_norm(layer.input_layernorm, x), several, checked)
        last_only = last_parts is not None
        if several is None:
            out = self._attend(index, parts[0], q, k, v, *rotations[0], masks[0], last_only)
        else:
            out = torch.cat([self._attend(index, part, part.of(q), part.of(k), part.of(v), cos, sin, mask,
                                          last_only).flatten(0, 1)
                             for part, (cos, sin), mask in zip(parts, rotations, masks, strict=True)])
        return self.o[index](out, last_parts if last_only and several else several, checked)[0]

    def _attend(self, index: int, part: Part, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, attend: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """One part's attention: its projections (b, T, ·) → its output (b, T, heads × head_dim), or (b, 1, ·) for
        its last input's query alone (`last_only`); its keys and values written to its cache."""
        batch, length = part.x.shape[:2]
        start, end, rows = part.start, part.start + length, part.cache_rows
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        if last_only:
            q = self.rotary.rotate(q[:, :, -1:], cos[:, :, -1:], sin[:, :, -1:])
            attend = attend[:, :, -1:]
        else:
            q = self.rotary.rotate(q, cos, sin)
        k = self.rotary.rotate(k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        keys, values = part.cache.keys[index], part.cache.values[index]
        if rows is None:
            keys[:, :, start:end], values[:, :, start:end] = k, v
            keys, values = keys[:, :, :end], values[:, :, :end]
        else:
            keys[rows, :, start:end], values[rows, :, start:end] = k, v
            keys, values = k, v
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, q.shape[2], -1)


def _last_inputs(parts: list[Part]) -> list[Part]:
    """Each part with its last input alone, the parts one after the other as a pass over them lays them out."""
    last, offset = [], 0
    for part in parts:
        last.append(replace(part, x=part.x[:, -1:], offset=offset))
        offset += len(part.x)
    return last


def _in_row_order(groups: list[Part], logits: list[torch.Tensor]) -> torch.Tensor:
    """The logits of a prefill's length groups (LlamaDecoder._prefill_parts), each in its rows' order, as one
    tensor in the batch's row order."""
    if len(groups) == 1:  # the one group is every row, in order
        return logits[0]
    out = logits[0].new_empty(sum(len(group.x) for group in groups), logits[0].shape[-1])
    for group, group_logits in zip(groups, logits, strict=True):
        out[group.cache_rows] = group_logits
    return out


def decoder_for(llm: PreTrainedModel) -> LlamaDecoder | HFDecoder:
    return LlamaDecoder(llm) if LlamaDecoder.supports(llm) else HFDecoder(llm)
