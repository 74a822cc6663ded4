"""The Zipper-LoRA formulation (adapters/zipper.py) against its definition in DESIGN.md §1."""

import copy

import pytest
import torch
from torch import nn

from adapters.zipper import (
    RowAdapters,
    Variant,
    ZipperConfig,
    ZipperLinear,
    clear_rows,
    inject,
    joining_rows,
    keep_rows,
    merge_language,
    room_rows,
    sharing_penalty,
    use_languages,
    use_segments,
    zipper_layers,
)


class _OneLinear(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        setattr(self, name, nn.Linear(6, 5 if name == "proj" else 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def _layer(variant: Variant, n_languages: int = 3) -> ZipperLinear:
    torch.manual_seed(0)
    config = ZipperConfig(variant=variant, rank=4, alpha=8.0, static_shared_ranks=2, n_languages=n_languages,
                          target_modules=("proj",))
    model = _OneLinear("proj")
    inject(model, config)
    layer = model.proj
    for name, param in layer.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    if variant in (Variant.HARD, Variant.SOFT):
        nn.init.normal_(layer.router.weight)
        nn.init.normal_(layer.router.bias)
    return layer


def _reference(layer: ZipperLinear, x: torch.Tensor, language: int) -> torch.Tensor:
    """y = W0 x + (α/r) B(l) A x with B(l) = B_s diag(g_l) + B_l diag(1 - g_l), written out per language."""
    config = layer.config
    a = layer.lora_A[language] if config.variant == Variant.INDEPENDENT else layer.lora_A
    if config.variant == Variant.SHARED:
        b = layer.lora_B_shared
    elif config.variant == Variant.INDEPENDENT:
        b = layer.lora_B_language[language]
    else:
        g = torch.diag(layer.gates()[language])
        b = layer.lora_B_shared @ g + layer.lora_B_language[language] @ (torch.eye(config.rank) - g)
    return layer.base(x) + config.scaling * x @ a.T @ b.T


@pytest.mark.parametrize("variant", list(Variant))
def test_mixed_language_batch_matches_definition(variant: Variant) -> None:
    layer = _layer(variant)
    x = torch.randn(4, 7, 6)
    languages = torch.tensor([0, 2, 1, 2])
    layer.languages = languages
    y = layer(x)
    for row, language in enumerate(languages.tolist()):
        assert torch.allclose(y[row], _reference(layer, x[row], language), atol=1e-5)


def test_gates_per_variant() -> None:
    assert torch.equal(_layer(Variant.SHARED).gates(), torch.ones(3, 4))
    assert torch.equal(_layer(Variant.INDEPENDENT).gates(), torch.zeros(3, 4))
    assert _layer(Variant.STATIC).gates()[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    hard = _layer(Variant.HARD).gates()
    assert set(hard.flatten().tolist()) <= {0.0, 1.0}
    soft = _layer(Variant.SOFT).gates()
    assert ((soft > 0) & (soft < 1)).all()


def test_hard_gates_pass_a_straight_through_gradient() -> None:
    layer = _layer(Variant.HARD)
    layer.gates().sum().backward()
    assert layer.router.bias.grad is not None and layer.router.bias.grad.abs().sum() > 0


def test_sharing_penalty_is_the_mean_language_specific_share_and_pulls_gates_towards_sharing() -> None:
    soft = _layer(Variant.SOFT)
    penalty = sharing_penalty(soft)
    assert penalty.item() == pytest.approx(1 - soft.gates().mean().item())
    penalty.backward()
    assert (soft.router.bias.grad < 0).all()  # descending it raises every gate logit: more of B_s
    assert sharing_penalty(_layer(Variant.STATIC)).item() == 0  # no router: nothing to pull
    weights = torch.tensor([1.0, 0.0, 0.0])  # only language 0 is pulled
    assert sharing_penalty(soft, weights).item() == pytest.approx((1 - soft.gates()[0].mean().item()) / 3)


def test_new_adapter_is_the_identity_and_only_adapters_train() -> None:
    torch.manual_seed(0)
    model = _OneLinear("q_proj")
    reference = model.q_proj.weight.clone()
    x = torch.randn(2, 6)
    before = model(x)
    inject(model, ZipperConfig(variant=Variant.SOFT, rank=4, n_languages=3))
    with use_languages(model, torch.tensor([0, 1])):
        assert torch.allclose(model(x), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "router" in n or "language_embedding" in n for n in trainable)
    assert torch.equal(model.q_proj.base.weight, reference)
    assert [name for name, _ in zipper_layers(model)] == ["q_proj"]


def test_routed_layer_without_languages_is_an_error() -> None:
    layer = _layer(Variant.SOFT)
    with pytest.raises(RuntimeError, match="use_languages"):
        layer(torch.randn(1, 6))


@pytest.mark.parametrize("variant", list(Variant))
def test_grouped_serving_path_equals_per_row_path(variant: Variant) -> None:
    layer = _layer(variant)
    model = layer  # merge_language walks the Zipper layers of any module
    x = torch.randn(5, 3, 6)
    languages = torch.tensor([1, 1, 0, 2, -1])  # grouped by language; -1: unknown
    layer.languages = languages
    expected = layer(x)
    layer.languages = None
    adapters = {code: merge_language(model, None if code == -1 else code) for code in (0, 1, 2, -1)}
    segments = [(0, 2, adapters[1]), (2, 3, adapters[0]), (3, 4, adapters[2]), (4, 5, adapters[-1])]
    with use_segments(model, segments):
        assert torch.allclose(layer(x), expected, atol=1e-5)
    if variant == Variant.INDEPENDENT:  # unknown language: no update at all
        assert torch.allclose(expected[4], layer.base(x[4]))
    else:  # unknown language: the shared subspace alone
        shared = layer.base(x[4]) + layer.config.scaling * x[4] @ layer.lora_A.T @ layer.lora_B_shared.T
        assert torch.allclose(expected[4], shared, atol=1e-5)
    assert adapters[0].nbytes > 0


@pytest.mark.parametrize("variant", list(Variant))
@pytest.mark.parametrize("shape", [(4, 3, 6), (4, 6)])
def test_serving_path_with_one_adapter_or_without_time_axis(variant: Variant, shape: tuple[int, ...]) -> None:
    layer = _layer(variant)
    x = torch.randn(*shape)
    adapters = [merge_language(layer, code) for code in (0, 1)]
    for languages, segments in [([1, 1, 1, 1], [(0, 4, adapters[1])]),
                                ([0, 0, 1, 1], [(0, 2, adapters[0]), (2, 4, adapters[1])])]:
        layer.languages = torch.tensor(languages)
        expected = layer(x)
        layer.languages = None
        with use_segments(layer, segments):
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_hard_router_starts_as_static_so_that_it_can_learn() -> None:
    model = _OneLinear("proj")
    inject(model, ZipperConfig(variant=Variant.HARD, rank=4, static_shared_ranks=2, n_languages=3,
                               target_modules=("proj",)))
    layer = model.proj
    r_s = layer.config.static_shared_ranks
    gates = layer.gates()
    assert torch.equal(gates[:, :r_s], torch.ones_like(gates[:, :r_s]))
    assert torch.equal(gates[:, r_s:], torch.zeros_like(gates[:, r_s:]))
    # Under Initial-B (B_l = B_s) the language-specific ranks still get gradient, so B_l leaves B_s.
    with torch.no_grad():
        layer.lora_B_shared.normal_()
        layer.lora_B_language.copy_(layer.lora_B_shared.expand_as(layer.lora_B_language))
    layer.languages = torch.tensor([0, 1])
    layer(torch.randn(2, 3, layer.base.in_features)).square().sum().backward()
    assert layer.lora_B_language.grad[:, :, r_s:].abs().sum() > 0
    assert layer.lora_B_language.grad[:, :, :r_s].abs().sum() == 0


def test_rows_with_their_own_a_join_and_leave_without_a_room() -> None:
    """The independent baseline's per-language A: joining rows' (A, B) are concatenated (no RowsRoom)."""
    generator = torch.Generator().manual_seed(1)
    running = RowAdapters(torch.randn(2, 5, 4, generator=generator), torch.randn(2, 4, 6, generator=generator))
    joining = RowAdapters(torch.randn(5, 4, generator=generator), torch.randn(4, 6, generator=generator))
    joined = running.appended(joining, 2, 3)
    assert joined.shared is None
    assert torch.equal(joined.a, torch.cat([running.a, joining.a.expand(3, -1, -1)]))
    assert torch.equal(joined.b, torch.cat([running.b, joining.b.expand(3, -1, -1)]))
    kept = joined.select(torch.tensor([1, 3]))
    assert torch.equal(kept.a, joined.a[[1, 3]]) and torch.equal(kept.b, joined.b[[1, 3]])


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.down_proj = nn.Linear(6, 6), nn.Linear(6, 4)


def test_a_serving_batch_keeps_every_layer_s_rows_in_one_room() -> None:
    """joining_rows and keep_rows, rows of several languages: every layer's per-row B(l) are views of one RowsRoom
    (written in place while it has room, grown when it has not), and each row's are its language's merged B(l)."""
    torch.manual_seed(0)
    model = _TwoLinears()
    inject(model, ZipperConfig(variant=Variant.SOFT, rank=4, n_languages=3, target_modules=("q_proj", "down_proj")))
    for name, param in model.named_parameters():
        if "lora_B" in name or "router" in name:
            nn.init.normal_(param)
    adapters = [merge_language(model, language) for language in range(3)]
    layers = [layer for _, layer in zipper_layers(model)]

    def expected(languages: list[int]) -> list[torch.Tensor]:
        return [torch.stack([adapters[language].b[index].T for language in languages]) for index in range(2)]

    def assert_rows(languages: list[int]) -> None:
        room = layers[0].rows.shared
        assert room is not None and all(layer.rows.shared is room for layer in layers)
        assert all(torch.equal(layer.rows.b, b) for layer, b in zip(layers, expected(languages), strict=True))

    with joining_rows(model, 0, [(0, 2, adapters[0]), (2, 3, adapters[2])]):
        pass
    assert_rows([0, 0, 2])
    room = layers[0].rows.shared
    with joining_rows(model, 3, [(0, 1, adapters[1])]):
        assert all(torch.equal(layer.rows.b, b) for layer, b in zip(layers, expected([1]), strict=True))  # alone
    assert_rows([0, 0, 2, 1])
    assert layers[0].rows.shared is room  # written into the room the batch had
    keep_rows(model, torch.tensor([0, 3, 2]))  # as Generation keeps rows: in place, the last one filling a gap
    assert_rows([0, 1, 2])
    keep_rows(model, torch.tensor([1, 0]))  # any other order
    assert_rows([1, 0])
    assert layers[0].rows.shared is room  # kept in the room the batch had
    with joining_rows(model, 2, [(0, 3, adapters[2]), (3, 7, adapters[0])]):
        pass
    assert_rows([1, 0, 2, 2, 2, 0, 0, 0, 0])
    assert len(layers[0].rows.shared.flat) == room_rows(9)  # grown

    failing = [layer.rows for layer in layers]
    with pytest.raises(RuntimeError), joining_rows(model, 9, [(0, 1, adapters[1])]):
        raise RuntimeError
    assert all(layer.rows is rows for layer, rows in zip(layers, failing, strict=True))  # the running rows' stay
    with joining_rows(model, 9, [(0, 1, adapters[2])]):  # over the row that failed to join
        pass
    assert_rows([1, 0, 2, 2, 2, 0, 0, 0, 0, 2])

    clear_rows(model)  # a batch of one language: one matrix for all its rows, until another language joins
    with joining_rows(model, 0, [(0, 2, adapters[2])]):
        pass
    assert layers[0].rows.shared is None and layers[0].rows.b.dim() == 2
    with joining_rows(model, 2, [(0, 1, adapters[0])]):
        pass
    assert_rows([2, 2, 0])


def test_a_copied_model_lists_its_own_zipper_layers() -> None:
    """`inject` lists a model's Zipper layers once; a copy of the model lists the copy's, in layer order."""
    model = _TwoLinears()
    inject(model, ZipperConfig(variant=Variant.SOFT, rank=4, n_languages=3, target_modules=("q_proj", "down_proj")))
    copied = copy.deepcopy(model)
    assert [layer for _, layer in zipper_layers(copied)] == [copied.q_proj, copied.down_proj]
    assert [(name, layer.index) for name, layer in zipper_layers(model)] == [("q_proj", 0), ("down_proj", 1)]
