"""Zipper-LoRA, the formulation (DESIGN.md §1), in one place.

For a frozen linear layer W0 (out × in) and rank r:

    A      (r × in)        shared by all languages
    B_s    (out × r)       the shared B
    B_l    (out × r)       language l's own B
    g_l    ∈ [0,1]^r       per-rank gates from a language-conditioned router
    B(l) = B_s · diag(g_l) + B_l · diag(1 − g_l)
    y    = W0 x + (α / r) · B(l) · (A x)

Variants differ only in g_l: SHARED (g = 1: one LoRA for all), STATIC (the first r_s ranks
shared, the rest language-specific), HARD (1[σ(z) > 0.5] with a straight-through gradient),
SOFT (σ(z)). INDEPENDENT is the other baseline: one (A_l, B_l) per language.

The router reads only the language, never the tokens, so for a fixed language B(l) is a constant:
`merged_b(l)` gives an ordinary rank-r LoRA (A, B(l)) per language. A batch that mixes languages
computes A x once; only the B step depends on the row's language: one batched GEMM over each row's B(l).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn


class Variant(StrEnum):
    SHARED = "shared"
    STATIC = "static"
    HARD = "hard"
    SOFT = "soft"
    INDEPENDENT = "independent"


@dataclass
class ZipperConfig:
    variant: Variant = Variant.SHARED
    rank: int = 16
    alpha: float = 32.0
    static_shared_ranks: int = 8  # r_s: how many leading ranks the STATIC variant shares
    n_languages: int = 12
    language_dim: int = 16  # size of the learned language embedding e_l the routers read
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LanguageEmbedding(nn.Module):
    """The e_l every router reads: one table shared by all adapted modules."""

    def __init__(self, n_languages: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_languages, dim) * 0.1)


def _hard_gate(logits: torch.Tensor) -> torch.Tensor:
    soft = torch.sigmoid(logits)
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())  # forward exactly binary, backward σ'


class ZipperLinear(nn.Module):
    """A frozen nn.Linear plus a Zipper-LoRA update. Rows of one batch may be of different languages:
    set `languages` (B,) with `use_languages()` before the forward pass."""

    def __init__(self, base: nn.Linear, config: ZipperConfig, language_embedding: LanguageEmbedding | None) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.language_embedding = [language_embedding]  # a list so the shared table isn't a submodule
        self.languages: torch.Tensor | None = None  # training/eval path: per-row language indices
        self.rows: RowAdapters | None = None  # serving path: each row's merged adapter, gathered per batch
        self.index = 0  # position among the model's Zipper layers (MergedAdapter lists are in this order)
        r, n = config.rank, config.n_languages
        out_features, in_features = base.weight.shape
        independent = config.variant == Variant.INDEPENDENT
        a_shape = (n, r, in_features) if independent else (r, in_features)
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        for a in self.lora_A.view(-1, r, in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT initialises A
        if config.variant in (Variant.SHARED, Variant.STATIC, Variant.HARD, Variant.SOFT):
            self.lora_B_shared = nn.Parameter(torch.zeros(out_features, r))
        if config.variant != Variant.SHARED:
            self.lora_B_language = nn.Parameter(torch.zeros(n, out_features, r))
        if config.variant in (Variant.HARD, Variant.SOFT):
            self.router = nn.Linear(config.language_dim, r)
            nn.init.zeros_(self.router.weight)
            nn.init.constant_(self.router.bias, 2.0)  # start mostly shared: the warm-started B_s
            if config.variant == Variant.HARD:
                # Start as STATIC instead: a gate that is exactly 1 gives its rank of B_l no gradient, and
                # under Initial-B (B_l = B_s) neither does the router, so an all-shared start stays the
                # shared LoRA for ever. Language-specific ranks let B_l and B_s move apart, and then the
                # router's straight-through gradient, ∝ (B_s − B_l), can move any rank across.
                self.router.bias.data[config.static_shared_ranks:] = -2.0
        self.dropout = nn.Dropout(config.dropout)

    def gates(self) -> torch.Tensor:
        """Per-language, per-rank share of B_s: (n_languages, r)."""
        config = self.config
        r, n = config.rank, config.n_languages
        device = self.lora_A.device
        if config.variant == Variant.SHARED:
            return torch.ones(n, r, device=device)
        if config.variant == Variant.INDEPENDENT:
            return torch.zeros(n, r, device=device)
        if config.variant == Variant.STATIC:
            return (torch.arange(r, device=device) < config.static_shared_ranks).float().expand(n, r)
        logits = self.router(self.language_embedding[0].weight)
        return _hard_gate(logits) if config.variant == Variant.HARD else torch.sigmoid(logits)

    def merged_b(self) -> torch.Tensor:
        """B(l) for every language: (n_languages, out, r)."""
        if self.config.variant == Variant.SHARED:
            return self.lora_B_shared.expand(self.config.n_languages, -1, -1)
        if self.config.variant == Variant.INDEPENDENT:
            return self.lora_B_language
        g = self.gates()[:, None, :]
        return self.lora_B_shared[None] * g + self.lora_B_language * (1 - g)

    def merged_b_table(self) -> torch.Tensor:
        """B(l) for every language plus, last (index -1), the fallback for an unknown language: the
        shared subspace alone (B_s), or no update at all for the independent baseline."""
        table = self.merged_b()
        fallback = torch.zeros_like(table[0]) if self.config.variant == Variant.INDEPENDENT else self.lora_B_shared
        return torch.cat([table, fallback[None]])

    def merged_a(self) -> torch.Tensor:
        """A for every language: (n_languages, r, in)."""
        if self.config.variant == Variant.INDEPENDENT:
            return self.lora_A
        return self.lora_A.expand(self.config.n_languages, -1, -1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.config.variant == Variant.SHARED:
            return (x @ self.lora_A.T) @ self.lora_B_shared.T
        if self.languages is None:
            raise RuntimeError("Zipper-LoRA layer needs per-row languages: wrap the call in use_languages()")
        if self.config.variant == Variant.INDEPENDENT:
            ax = torch.einsum("b...i,bri->b...r", x, self.lora_A[self.languages])
        else:
            ax = x @ self.lora_A.T  # once for the whole mixed-language batch
        b_rows = self.merged_b_table()[self.languages]  # (B, out, r); index -1: unknown language
        return torch.einsum("b...r,bor->b...o", ax, b_rows)

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("rows", "languages"):  # a batch's state, set at every join and keep: never a parameter, module or
            object.__setattr__(self, name, value)  # buffer, so nn.Module's checks (1 µs a layer) are skipped
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:  # serving (speechllm.decoder packs W0 and A of such layers into one GEMM)
            return self.rows.add_update(self.base(x), self.rows.a_times(x, self.lora_A), self.config.scaling)
        return self.base(x) + self.config.scaling * self.delta(x).to(x.dtype)


def inject(model: nn.Module, config: ZipperConfig) -> LanguageEmbedding | None:
    """Replace each target nn.Linear of `model` by a ZipperLinear; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    routed = config.variant in (Variant.HARD, Variant.SOFT)
    embedding = LanguageEmbedding(config.n_languages, config.language_dim) if routed else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.split(".")[-1] in config.target_modules]
    for index, (name, module) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        layer = ZipperLinear(module, config, embedding)
        layer.index = index
        setattr(model.get_submodule(parent_name), child, layer)
    if embedding is not None:
        model.zipper_language_embedding = embedding  # registered once, trained with the routers
    model.__dict__.pop("_zipper_layers", None)  # (walked afresh)
    model.__dict__["_zipper_layers"] = list(zipper_layers(model))
    return embedding


def sharing_penalty(model: nn.Module, language_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean share of B_l over every routed layer, language and rank, mean(1 − g_l), each language weighted
    by `language_weights` (n_languages,; default 1). A prior towards sharing for training: a language whose own
    data does not pay for a language-specific rank is pulled back to B_s. Zero for the variants without a
    router."""
    gates = [layer.gates() for _, layer in zipper_layers(model) if hasattr(layer, "router")]
    if not gates:
        return torch.zeros(())
    specific = 1 - torch.stack(gates).mean((0, 2))  # per language
    if language_weights is not None:
        specific = specific * language_weights.to(specific.device)
    return specific.mean()


def zipper_layers(model: nn.Module) -> Iterator[tuple[str, ZipperLinear]]:
    """The Zipper layers of `model`, with their names, in layer order (MergedAdapter's, and `layer.index`'s). Those
    of a model `inject` adapted are listed there, once (serving asks for them at every join and keep, and walking the
    shipped decoder's modules takes 87 µs): a Zipper layer swapped for another after `inject` is not seen."""
    listed = model.__dict__.get("_zipper_layers")
    if listed is not None:
        return iter(listed)
    return ((name, module) for name, module in model.named_modules() if isinstance(module, ZipperLinear))


@contextmanager
def _set_on_layers(model: nn.Module, attribute: str, value: object) -> Iterator[None]:
    layers = [layer for _, layer in zipper_layers(model)]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, attribute, None)


def use_languages(model: nn.Module, languages: torch.Tensor | None) -> AbstractContextManager[None]:
    """Run forward passes of `model` with per-row language indices (B,); -1: unknown language."""
    return _set_on_layers(model, "languages", languages)


@dataclass
class MergedAdapter:
    """One language's adapter as a plain LoRA, one (A, B(l)) per Zipper layer in layer order.
    `a` is None when A is shared (every variant but independent): the batch's A x is reused."""

    a: list[torch.Tensor] | None
    b: list[torch.Tensor]  # per layer (out, r), views into `flat_b` when it is there
    # Every layer's B(l) in one buffer, layer after layer, each laid out as its transpose (r, out): what a row of a
    # serving batch's RowsRoom holds (None: the matrices stand alone).
    flat_b: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a or []) + self.b)


@torch.no_grad()
def merge_language(model: nn.Module, language: int | None) -> MergedAdapter:
    """Materialise B(l) (and A_l for the independent baseline) for language index `language`;
    None: an unknown language, served by the shared subspace alone."""
    layers = [layer for _, layer in zipper_layers(model)]
    row = -1 if language is None else language
    # Each B(l) (out, r) is laid out as its transpose (r, out) in memory, as the B step reads it (RowAdapters):
    # gathering a batch's per-row matrices is then a plain copy (half the time of a strided one). All of them in one
    # buffer, so that a row joining a batch is one copy for every layer (RowsRoom).
    transposed = [layer.merged_b_table()[row].detach().T for layer in layers]
    flat_b = transposed[0].new_empty(sum(t.numel() for t in transposed))
    b = []
    for view, t in zip(flat_b.split([t.numel() for t in transposed]), transposed, strict=True):
        b.append(view.view(t.shape).copy_(t).T)
    independent = layers[0].config.variant == Variant.INDEPENDENT
    a = [layer.lora_A[row].detach().clone() for layer in layers] if independent and language is not None else None
    if independent and language is None:
        a = [layer.lora_A[0].detach().clone() for layer in layers]  # B is zero: any A gives no update
    return MergedAdapter(a, b, flat_b)


def language_runs(keys: Sequence[Hashable], adapter_of: Callable[[Hashable], MergedAdapter]
                  ) -> list[tuple[int, int, MergedAdapter]]:
    """A batch's rows in runs of one key (a language's), each with that key's adapter (`adapter_of`, asked once a
    run): the segments of use_segments and joining_rows."""
    segments, start = [], 0
    for row in range(1, len(keys) + 1):
        if row == len(keys) or keys[row] != keys[start]:
            segments.append((start, row, adapter_of(keys[start])))
            start = row
    return segments


def room_rows(rows: int) -> int:
    """How many rows a running batch's per-row tensors (its rows' adapters here, its KV cache: speechllm.decoder)
    have room for when it holds `rows`: the next power of two, at least 8, so that a batch that rows keep joining
    is copied whole only when it doubles."""
    return max(8, 1 << (rows - 1).bit_length())


def row_moves(keep: torch.Tensor) -> list[tuple[int, int]]:
    """For a batch that keeps the rows at positions `keep` (in that order) in the room it has: (target, source) for
    each position that gets another row, in increasing order of target. Rows that stay where they are need no copy."""
    return [(target, source) for target, source in enumerate(keep.tolist()) if target != source]


def move_rows(x: torch.Tensor, moves: list[tuple[int, int]]) -> None:
    """x's rows (its first dimension) moved in place: row `source` to row `target` for each of `moves` (row_moves).
    Row by row, where no row is written before it is read (each source after its target, as
    speechllm.decoding.kept_in_place makes them); otherwise through a copy of the sources. A copy of a row is
    4 times as fast as `index_copy_` of it for a room's adapter rows (640 KB: 14 against 55 µs)."""
    if all(source > target for target, source in moves):
        for target, source in moves:
            x[target].copy_(x[source])
    elif moves:
        targets, sources = zip(*moves, strict=True)
        x[list(targets)] = x[list(sources)]


@dataclass
class RowAdapters:
    """One Zipper layer's adapters for the rows of a serving batch, gathered once per batch so that every
    forward pass is one batched GEMM per factor whatever the language mix: with one adapter for the whole
    batch the factors are its plain matrices; otherwise row i's (in, r) and (r, out) matrices, stacked."""

    a: torch.Tensor | None  # (in, r) or (rows, in, r); None: the layer's shared A
    b: torch.Tensor  # (r, out) or (rows, r, out)
    # The serving batch's RowsRoom when `b` is this layer's view of it (joining_rows, keep_rows).
    shared: RowsRoom | None = None

    def a_times(self, x: torch.Tensor, shared_a: torch.Tensor) -> torch.Tensor:
        """A x (B, [T,] r) for x (B, [T,] in); `shared_a` (r, in) is the layer's A, used when `a` is None."""
        if self.a is None:
            return x @ shared_a.T
        return (x[:, None] @ self.a)[:, 0] if x.dim() == 2 else x @ self.a

    def add_update(self, y: torch.Tensor, ax: torch.Tensor, scaling: float) -> torch.Tensor:
        """y + scaling · B(l) A x, for y = W0 x (B, [T,] out) and ax = A x (B, [T,] r). Not in place: y is
        usually one layer's columns of a packed GEMM's output, and torch's in-place baddbmm_ on such a strided view
        loops over the rows one addmm at a time (a decoding step of 16 rows took 3.4 → 4.0 ms)."""
        timeless = y.dim() == 2
        ax3, y3 = (ax[:, None], y[:, None]) if timeless else (ax, y)
        if self.b.dim() == 2:
            out = torch.addmm(y3.flatten(0, 1), ax3.flatten(0, 1), self.b, alpha=scaling).view_as(y3)
        else:
            out = torch.baddbmm(y3, ax3, self.b, alpha=scaling)
        return out[:, 0] if timeless else out

    def select(self, rows: torch.Tensor | slice | None) -> RowAdapters:
        """The adapters of the batch's rows `rows` (None: all of them)."""
        if rows is None or self.b.dim() == 2:  # one adapter for every row
            return self
        return RowAdapters(None if self.a is None else self.a[rows], self.b[rows])

    def appended(self, joining: RowAdapters, running: int, joining_count: int) -> RowAdapters:
        """These adapters of `running` rows, then those of `joining_count` rows joining them, one matrix per row: for
        batches that keep no RowsRoom (the independent baseline's per-language A)."""
        old, new = _per_row(self, running), _per_row(joining, joining_count)
        a = None if old.a is None else torch.cat([old.a, new.a])  # (a model's layers are all of one variant)
        return RowAdapters(a, torch.cat([old.b, new.b]))


@dataclass
class RowsRoom:
    """Every Zipper layer's per-row B matrices of a serving batch in one buffer: row i's B(l) for all the layers side
    by side in `flat[i]`, as MergedAdapter.flat_b lays them out, with room for more rows. A row that joins is one
    copy for all the layers, and so is a row that moves when others leave (`keep`), where per-layer matrices took
    a concatenation and a copy in each of the 28 layers: a join of 3 rows into 9 took 0.85 ms, now 0.41, a keep of
    10 of 13 rows 0.85 ms, then 0.51 (docs/serving.md, *Continuous batching*). Each layer's RowAdapters.b is a view of
    its columns (`views`): `baddbmm` reads such views as fast as contiguous matrices."""

    flat: torch.Tensor  # (room rows, every layer's r × out)
    shapes: list[torch.Size]  # per layer: its B(l) as laid out, (r, out)
    # Each layer's (room rows, r, out) view of `flat`, made once: slicing them is cheaper than cutting and shaping
    # `flat` again at every join and keep.
    layer_views: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        columns = self.flat.split([shape.numel() for shape in self.shapes], dim=1)
        self.layer_views = [block.unflatten(1, shape) for block, shape in zip(columns, self.shapes, strict=True)]

    @classmethod
    def like(cls, adapter: MergedAdapter, rows: int) -> RowsRoom:
        """Room for `rows` rows of `adapter`'s layout (nothing written)."""
        return cls(adapter.flat_b.new_empty(rows, adapter.flat_b.numel()), [b.T.shape for b in adapter.b])

    def views(self, start: int, end: int) -> list[torch.Tensor]:
        """Rows [start, end) as each layer's (rows, r, out) matrices, in layer order."""
        return [view[start:end] for view in self.layer_views]

    def adapters(self, rows: int) -> list[RowAdapters]:
        """Each layer's adapters of the batch's first `rows` rows, views of this room."""
        return [RowAdapters(None, view, shared=self) for view in self.views(0, rows)]

    def grown(self, rows: int, total: int) -> RowsRoom:
        """This room if it holds `total` rows; else a larger one with its first `rows` rows copied."""
        if total <= len(self.flat):
            return self
        room = self._new(total)
        room.flat[:rows] = self.flat[:rows]
        return room

    def keep(self, keep: torch.Tensor) -> None:
        """Only this room's rows `keep` stay, in that order, in place: only the rows that change position are copied
        (speechllm.decoding.Generation keeps the rows that stay where they are, where it can)."""
        move_rows(self.flat, row_moves(keep))

    def _new(self, rows: int) -> RowsRoom:
        return RowsRoom(self.flat.new_empty(room_rows(rows), self.flat.shape[1]), self.shapes)


def _shared_room(rows: list[RowAdapters | None]) -> RowsRoom | None:
    """The RowsRoom whose views a batch's layers' adapters `rows` are (every layer's or none's), if any."""
    return rows[0].shared if rows and rows[0] is not None else None


def _room_for_joining(saved: list[RowAdapters | None], running: int, segments: list[tuple[int, int, MergedAdapter]]
                      ) -> RowsRoom | None:
    """The RowsRoom that a batch of `running` rows (each layer's adapters `saved`) and the rows of `segments` joining
    it decode in, the running rows' matrices in it; None where a batch keeps per-layer matrices: the independent
    baseline's per-language A, and a batch of one language alone (one matrix for all its rows, no copies)."""
    if not segments or any(adapter.flat_b is None or adapter.a is not None for _, _, adapter in segments):
        return None
    total = running + segments[-1][1]
    if not running:
        return RowsRoom.like(segments[0][2], room_rows(total)) if len(segments) > 1 else None
    shared = _shared_room(saved)
    if shared is not None:
        return shared.grown(running, total)
    if all(rows is not None and rows.a is None and rows.b.dim() == 2 for rows in saved):  # one adapter for all
        room = RowsRoom.like(segments[0][2], room_rows(total))
        for view, rows in zip(room.views(0, running), saved, strict=True):
            view.copy_(rows.b.expand_as(view))
        return room
    return None


def _row_adapters(index: int, segments: list[tuple[int, int, MergedAdapter]]) -> RowAdapters:
    if len(segments) == 1:
        adapter = segments[0][2]
        return RowAdapters(None if adapter.a is None else adapter.a[index].T, adapter.b[index].T)
    b = torch.cat([adapter.b[index].T.expand(end - start, -1, -1) for start, end, adapter in segments])
    if all(adapter.a is None for _, _, adapter in segments):
        return RowAdapters(None, b)
    a = torch.cat([adapter.a[index].T.expand(end - start, -1, -1) for start, end, adapter in segments])
    return RowAdapters(a, b)


@contextmanager
def use_segments(model: nn.Module, segments: list[tuple[int, int, MergedAdapter]]) -> Iterator[None]:
    """Run forward passes with rows [start, end) using that segment's merged adapter (segments in row order,
    covering the batch)."""
    layers = [layer for _, layer in zipper_layers(model)]
    for layer in layers:
        layer.rows = _row_adapters(layer.index, segments)
    try:
        yield
    finally:
        for layer in layers:
            layer.rows = None


def _per_row(rows: RowAdapters, count: int) -> RowAdapters:
    """The same adapters with one matrix per row ((rows, in, r), (rows, r, out))."""
    if rows.b.dim() == 3:
        return rows
    return RowAdapters(None if rows.a is None else rows.a.expand(count, -1, -1), rows.b.expand(count, -1, -1))


@contextmanager
def joining_rows(model: nn.Module, running: int, segments: list[tuple[int, int, MergedAdapter]]) -> Iterator[None]:
    """Rows join a batch of `running` rows (continuous batching): inside, forward passes see only the joining
    rows, with the adapters of `segments` (their prefill); afterwards the batch goes on with the joining rows after
    the running ones, every layer's per-row B(l) in one RowsRoom (but a batch of one language alone, which needs one
    matrix for all its rows, and the independent baseline, whose rows bring their own A). With no running rows this
    is `use_segments` without the clearing (`clear_rows` does that)."""
    layers = [layer for _, layer in zipper_layers(model)]
    saved = [layer.rows for layer in layers]
    room = _room_for_joining(saved, running, segments)
    if room is not None:
        total = running + segments[-1][1]
        for start, end, adapter in segments:
            room.flat[running + start: running + end] = adapter.flat_b
        joining = [RowAdapters(None, view) for view in room.views(running, total)]
    else:
        joining = [_row_adapters(layer.index, segments) for layer in layers]
    for layer, rows in zip(layers, joining, strict=True):
        layer.rows = rows
    try:
        yield
    except BaseException:
        for layer, rows in zip(layers, saved, strict=True):
            layer.rows = rows
        raise
    if room is not None:
        for layer, rows in zip(layers, room.adapters(total), strict=True):
            layer.rows = rows
    elif running and segments:  # (a model without adapters has nothing to append)
        count = segments[-1][1]
        for layer, old, new in zip(layers, saved, joining, strict=True):
            layer.rows = old.appended(new, running, count)


def clear_rows(model: nn.Module) -> None:
    """The batch set with `joining_rows` has ended."""
    for _, layer in zipper_layers(model):
        layer.rows = None


def keep_rows(model: nn.Module, keep: torch.Tensor) -> None:
    """Rows of the batch set with `use_segments`, `joining_rows` or `use_languages` left it: only those at positions
    `keep` (in the batch as it was) stay. A serving batch in a RowsRoom keeps them in it (RowsRoom.keep: the rows that
    move, for all the layers at once)."""
    layers = [layer for _, layer in zipper_layers(model)]
    shared = _shared_room([layer.rows for layer in layers])
    if shared is None:
        _only_rows(model, keep, RowAdapters.select)
        return
    shared.keep(keep)
    for layer, rows in zip(layers, shared.adapters(len(keep)), strict=True):
        layer.rows = rows


def _only_rows(model: nn.Module, rows: torch.Tensor, pick: Callable[[RowAdapters, torch.Tensor], RowAdapters]
               ) -> None:
    """Every Zipper layer's adapters (picked with `pick`) and languages for the batch's rows `rows` only."""
    for _, layer in zipper_layers(model):
        if layer.rows is not None:
            layer.rows = pick(layer.rows, rows)
        if layer.languages is not None:
            layer.languages = layer.languages[rows.to(layer.languages.device)]


@contextmanager
def use_rows(model: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Forward passes of only the rows at positions `rows` of the batch set with `use_segments` or
    `use_languages`; the whole batch's adapters come back afterwards."""
    layers = [layer for _, layer in zipper_layers(model)]
    saved = [(layer.rows, layer.languages) for layer in layers]
    _only_rows(model, rows, RowAdapters.select)
    try:
        yield
    finally:
        for layer, (row_adapters, languages) in zip(layers, saved, strict=True):
            layer.rows, layer.languages = row_adapters, languages


def is_adapter_tensor(name: str) -> bool:
    """Whether a parameter name belongs to the Zipper adapter (not to the frozen base model)."""
    return "lora_" in name or ".router." in name or "zipper_language_embedding" in name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable Zipper tensors only (what a checkpoint of the adapter holds)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_tensor(name)}
