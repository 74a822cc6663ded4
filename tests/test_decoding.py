import pytest
import torch

from adapters.zipper import (
    Variant,
    ZipperConfig,
    clear_rows,
    joining_rows,
    keep_rows,
    merge_language,
    room_rows,
    use_segments,
    zipper_layers,
)
from speechllm.decoder import PREFILL_CALL_TOKENS, SLOT_HEADROOM, HFDecoder, KVCache, LlamaDecoder, decoder_for
from speechllm.decoding import Generation, RowTokens, _argmax, generate, kept_in_place, left_pad
from speechllm.inference import transcribe_features
from speechllm.padding import length_groups
from tests.conftest import tiny_speech_llm


def _prompts(dim: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(n, dim) for n in (7, 3, 12)]


def _random_adapters(model) -> None:
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # make every language's adapter do something


def test_our_decoder_gives_hugging_face_s_logits(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    embeds, mask = left_pad(_prompts(model.llm.config.hidden_size))
    decoder = LlamaDecoder(model.llm)
    ours, cache = decoder.prefill(embeds, mask, max_new_tokens=2)
    theirs, state = HFDecoder(model.llm).prefill(embeds, mask, max_new_tokens=2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    tokens = ours.argmax(-1)
    torch.testing.assert_close(decoder.step(tokens, cache), HFDecoder(model.llm).step(tokens, state),
                               atol=1e-5, rtol=1e-5)


def test_a_prefill_s_last_layer_runs_its_feed_forward_on_each_row_s_last_input_alone(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    embeds, mask = left_pad(_prompts(model.llm.config.hidden_size))  # 3 rows of 12 positions
    decoder = LlamaDecoder(model.llm)
    rows_seen: dict[int, list[int]] = {0: [], len(decoder.layers) - 1: []}
    for index, seen in rows_seen.items():
        packed = decoder.gate_up[index]
        decoder.gate_up[index] = lambda x, *rest, packed=packed, seen=seen: seen.append(x[..., 0].numel()) or packed(
            x, *rest)
    decoder.prefill(embeds, mask, max_new_tokens=2)
    assert rows_seen == {0: [3 * 12], len(decoder.layers) - 1: [3]}  # (the logits: the test above)


@pytest.mark.parametrize("variant", [Variant.SOFT, Variant.INDEPENDENT])  # A shared (packed) or per language
def test_our_decoder_decodes_as_hugging_face_with_mixed_language_adapters(tiny_tokenizer, variant) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=variant, rank=4))
    _random_adapters(model)
    prompts = _prompts(model.llm.config.hidden_size)
    segments = [(0, 1, merge_language(model.llm, 0)), (1, 3, merge_language(model.llm, 5))]
    limits = [15, 4, 9]  # rows leave the batch at different steps
    results = []
    for decoder in (LlamaDecoder(model.llm), HFDecoder(model.llm)):
        with use_segments(model.llm, segments):
            results.append(generate(decoder, prompts, eos_id=-1, max_new_tokens=limits,
                                    on_rows_kept=lambda keep: keep_rows(model.llm, keep)))
    ours, theirs = results
    assert [h.tokens for h in ours] == [h.tokens for h in theirs]
    assert [len(h.tokens) for h in ours] == limits
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a.sum_logprob - b.sum_logprob) < 1e-3


def _unset_memory_is_nan(monkeypatch) -> None:
    """Tensors allocated without a value (the KV cache's slots not written yet) hold NaN, as freed memory may:
    a decoding that reads such a slot then gives NaN logits."""
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *size, **kw: new_empty(self, *size, **kw).fill_(float("nan"))
                        if self.is_floating_point() else new_empty(self, *size, **kw))


@pytest.mark.parametrize("variant", [Variant.SOFT, Variant.INDEPENDENT])
def test_rows_that_join_a_running_batch_decode_as_they_would_alone(tiny_tokenizer, variant, monkeypatch) -> None:
    _unset_memory_is_nan(monkeypatch)  # no slot is read before it is written or set to zero
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=variant, rank=4))
    _random_adapters(model)
    torch.manual_seed(3)
    dim = model.llm.config.hidden_size
    adapters = {language: merge_language(model.llm, language) for language in (0, 2, 5)}
    # (prompts, their languages, their token limits, steps the batch runs before the next group joins)
    groups = [([torch.randn(7, dim), torch.randn(3, dim)], [0, 5], [15, 4], 3),
              ([torch.randn(12, dim)], [5], [9], 5),  # joins after row 1 has left: the cache is compacted
              ([torch.randn(4, dim), torch.randn(30, dim)], [2, 0], [12, 6], 2),
              ([torch.randn(5, dim)], [0], [5], 0)]  # written into the room the batch's cache kept
    in_place = []
    joined_in_place = KVCache._joined_in_place
    monkeypatch.setattr(KVCache, "_joined_in_place", lambda cache, joining: in_place.append(len(joining.positions))
                        or joined_in_place(cache, joining))
    decoder = LlamaDecoder(model.llm)
    generation = Generation(decoder, eos_id=-1, on_rows_kept=lambda keep: keep_rows(model.llm, keep))
    rows, in_room = [], []
    first_layer = next(zipper_layers(model.llm))[1]
    for prompts, languages, limits, steps in groups:
        segments = [(i, i + 1, adapters[language]) for i, language in enumerate(languages)]
        with joining_rows(model.llm, len(generation.alive), segments):
            rows += generation.join(prompts, limits, [0.0] * len(prompts))
        in_room.append(first_layer.rows.shared is not None)
        for _ in range(steps):
            generation.step()
    batch_sizes = []
    while generation.alive:
        batch_sizes.append(len(generation.alive))
        generation.step()
    clear_rows(model.llm)
    alone = []
    for prompts, languages, limits, _ in groups:
        for prompt, language, limit in zip(prompts, languages, limits, strict=True):
            with use_segments(model.llm, [(0, 1, adapters[language])]):
                alone.append(generate(decoder, [prompt], eos_id=-1, max_new_tokens=limit)[0])
    assert [generation.hypothesis(row).tokens for row in rows] == [h.tokens for h in alone]
    assert [len(generation.hypothesis(row).tokens) for row in rows] == [15, 4, 9, 12, 6, 5]
    for row, hypothesis in zip(rows, alone, strict=True):
        assert abs(generation.hypothesis(row).sum_logprob - hypothesis.sum_logprob) < 1e-3
    assert max(batch_sizes) == 5 and min(batch_sizes) < 5  # five rows decoded together, and rows left
    assert in_place == [1]  # the last group's row joined the running rows' room; the others copied the batch
    assert in_room == [variant != Variant.INDEPENDENT] * len(groups)  # the rows' B(l) in one RowsRoom, but own A's


def test_rows_that_join_as_every_running_row_finishes_are_prefilled_alone(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    _random_adapters(model)
    torch.manual_seed(6)
    dim = model.llm.config.hidden_size
    first, joining = [torch.randn(5, dim)], [torch.randn(8, dim), torch.randn(3, dim)]
    adapters = [merge_language(model.llm, language) for language in (1, 4, 6)]
    decoder = LlamaDecoder(model.llm)
    generation = Generation(decoder, eos_id=-1, on_rows_kept=lambda keep: keep_rows(model.llm, keep))
    with joining_rows(model.llm, 0, [(0, 1, adapters[0])]):
        rows = generation.join(first, [1], [0.0])  # its first token is its last
    with joining_rows(model.llm, 1, [(0, 1, adapters[1]), (1, 2, adapters[2])]):
        rows += generation.join(joining, [5, 4], [0.0, 0.0])
    assert generation.pending == rows[1:]  # prefilled by the next step, in which the running row finishes
    assert generation.step()[1] == rows[:1] and generation.alive == rows[1:] and not generation.pending
    while generation.alive:
        generation.step()
    clear_rows(model.llm)
    alone = []
    for prompt, adapter, limit in zip(first + joining, adapters, [1, 5, 4], strict=True):
        with use_segments(model.llm, [(0, 1, adapter)]):
            alone.append(generate(decoder, [prompt], eos_id=-1, max_new_tokens=limit)[0].tokens)
    assert [generation.hypothesis(row).tokens for row in rows] == alone


def test_sampled_rows_join_and_decode_while_others_are_pending(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    _random_adapters(model)
    torch.manual_seed(7)
    dim = model.llm.config.hidden_size
    adapter = merge_language(model.llm, 2)
    generation = Generation(LlamaDecoder(model.llm), eos_id=-1, generator=torch.Generator().manual_seed(0),
                            on_rows_kept=lambda keep: keep_rows(model.llm, keep))
    rows = []
    for limit, temperature in ((7, 0.8), (5, 0.0), (6, 1.2)):  # each joins while the rows before it decode
        with joining_rows(model.llm, len(generation.alive), [(0, 1, adapter)]):
            rows += generation.join([torch.randn(5, dim)], [limit], [temperature])
        assert generation.pending == rows[1:][-1:]  # only the first row was prefilled as it joined
        generation.step()
    while generation.alive:
        generation.step()
    clear_rows(model.llm)
    assert [len(generation.hypothesis(row).tokens) for row in rows] == [7, 5, 6]


def test_a_batch_that_rows_keep_joining_forgets_the_rows_it_answered(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)  # no adapter: joining appends none
    torch.manual_seed(4)
    dim = model.llm.config.hidden_size
    prompts = [torch.randn(n, dim) for n in (5, 9, 3, 7, 4, 6)]
    decoder = LlamaDecoder(model.llm)
    generation = Generation(decoder, eos_id=-1, on_rows_kept=lambda keep: keep_rows(model.llm, keep))
    answers, held = {}, []
    for prompt in prompts:  # a new row every other step: the batch never drains
        with joining_rows(model.llm, len(generation.alive), []):
            generation.join([prompt], [6], [0.0])
        for _ in range(2):
            for row in generation.step()[1]:
                answers[row] = generation.hypothesis(row, forget=True).tokens
            held.append(len(generation.rows))
    while generation.alive:
        for row in generation.step()[1]:
            answers[row] = generation.hypothesis(row, forget=True).tokens
    assert generation.rows == {} and max(held) <= 5  # at most the rows still in the batch (3) and those leaving
    alone = [generate(decoder, [prompt], eos_id=-1, max_new_tokens=6)[0].tokens for prompt in prompts]
    assert [answers[row] for row in range(len(prompts))] == alone


def test_dropped_rows_leave_and_the_others_decode_as_they_would_alone(tiny_tokenizer, monkeypatch) -> None:
    """A request that gave up: its rows are dropped (Generation.drop), one decoding and one still pending, and the
    rows beside them decode as alone, with their adapters and cache rows still matched after the dropped rows
    leave; the dropped rows are forgotten once they have left."""
    _unset_memory_is_nan(monkeypatch)
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    _random_adapters(model)
    torch.manual_seed(8)
    dim = model.llm.config.hidden_size
    adapters = [merge_language(model.llm, language) for language in (0, 3, 5, 7)]
    prompts = [torch.randn(n, dim) for n in (6, 9, 4, 7)]
    limits = [12, 14, 10, 9]
    decoder = LlamaDecoder(model.llm)
    generation = Generation(decoder, eos_id=-1, on_rows_kept=lambda keep: keep_rows(model.llm, keep))
    with joining_rows(model.llm, 0, [(i, i + 1, adapters[i]) for i in range(3)]):
        rows = generation.join(prompts[:3], limits[:3], [0.0] * 3)
    generation.step()
    with joining_rows(model.llm, 3, [(0, 1, adapters[3])]):
        rows += generation.join(prompts[3:], limits[3:], [0.0])
    generation.drop(rows[1])  # decoding
    generation.drop(rows[3])  # pending: prefilled by the next step all the same
    steps = 0
    while generation.alive:
        emitted, finished = generation.step()
        assert rows[1] not in finished + [row for row, _ in emitted] and rows[3] not in finished
        steps += 1
        if steps == 3:
            assert rows[1] not in generation.alive and rows[3] not in generation.alive  # they left
    clear_rows(model.llm)
    assert rows[1] not in generation.rows and rows[3] not in generation.rows  # and were forgotten
    for row in (0, 2):
        with use_segments(model.llm, [(0, 1, adapters[row])]):
            alone = generate(decoder, [prompts[row]], eos_id=-1, max_new_tokens=limits[row])[0]
        assert generation.hypothesis(rows[row]).tokens == alone.tokens


def test_prefill_by_length_group_decodes_as_one_batch(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    _random_adapters(model)
    torch.manual_seed(2)
    prompts = [torch.randn(n, model.llm.config.hidden_size) for n in (5, 80, 6, 4)]
    assert len(length_groups([5, 80, 6, 4], PREFILL_CALL_TOKENS)) == 2  # the long prompt is prefilled alone
    segments = [(0, 2, merge_language(model.llm, 1)), (2, 4, merge_language(model.llm, 7))]
    embeds, mask = left_pad(prompts)
    with use_segments(model.llm, segments):
        ours, _ = LlamaDecoder(model.llm).prefill(embeds, mask, max_new_tokens=1)
        theirs, _ = HFDecoder(model.llm).prefill(embeds, mask, max_new_tokens=1)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        results = [generate(decoder, prompts, eos_id=-1, max_new_tokens=12)
                   for decoder in (LlamaDecoder(model.llm), HFDecoder(model.llm))]
    assert [h.tokens for h in results[0]] == [h.tokens for h in results[1]]


def test_a_step_and_a_prefill_in_one_pass_give_what_they_give_apart(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    _random_adapters(model)
    torch.manual_seed(5)
    dim = model.llm.config.hidden_size
    running, joining = [torch.randn(n, dim) for n in (6, 9)], [torch.randn(n, dim) for n in (5, 80, 7)]
    assert len(length_groups([5, 80, 7], PREFILL_CALL_TOKENS)) == 2  # the joining rows are two parts of the pass
    running_segments = [(0, 1, merge_language(model.llm, 0)), (1, 2, merge_language(model.llm, 3))]
    joining_segments = [(0, 1, merge_language(model.llm, 3)), (1, 3, merge_language(model.llm, 5))]
    decoder = LlamaDecoder(model.llm)
    with use_segments(model.llm, running_segments):
        first, cache = decoder.prefill(*left_pad(running), max_new_tokens=3)
        tokens = first.argmax(-1)
        step_apart = decoder.step(tokens, cache)
        with joining_rows(model.llm, 0, joining_segments):
            prefill_apart, joining_cache = decoder.prefill(*left_pad(joining), max_new_tokens=3)
        cache = KVCache.join(cache, joining_cache)
    with use_segments(model.llm, running_segments):
        _, mixed_cache = decoder.prefill(*left_pad(running), max_new_tokens=3)
        with joining_rows(model.llm, 2, joining_segments):  # the batch: the running rows' adapters, then these
            assert decoder.can_mix()
        together, mixed_cache = decoder.step_and_prefill(tokens, mixed_cache, *left_pad(joining), max_new_tokens=3)
        torch.testing.assert_close(together, torch.cat([step_apart, prefill_apart]), atol=1e-5, rtol=1e-5)
        next_tokens = together.argmax(-1)  # and the batch decodes on from either cache alike
        torch.testing.assert_close(decoder.step(next_tokens, mixed_cache), decoder.step(next_tokens, cache),
                                   atol=1e-5, rtol=1e-5)


def test_rows_join_the_room_a_cache_left_in_place_as_a_copying_join_would(tiny_tokenizer) -> None:
    """KVCache.join writes the joining rows into the room a copying join (or `keep`) left, without copying the
    running rows; the batch holds the same keys and values either way."""
    decoder = LlamaDecoder(tiny_speech_llm(tiny_tokenizer).llm)
    torch.manual_seed(6)

    def cache(lengths: tuple[int, ...]) -> KVCache:
        prompts = [torch.randn(n, decoder.llm.config.hidden_size) for n in lengths]
        return decoder.prefill(*left_pad(prompts), max_new_tokens=6)[1]

    def assert_same(cache: KVCache, expected: KVCache) -> None:
        length = expected.length
        assert cache.length == length and torch.equal(cache.positions, expected.positions)
        assert torch.equal(cache.valid[:, :length], expected.valid[:, :length])
        for ours, theirs in zip(cache.keys + cache.values, expected.keys + expected.values, strict=True):
            assert torch.equal(ours[:, :, :length], theirs[:, :, :length])

    running = KVCache.join(cache((9, 12)), cache((7,)))  # a copying join: room for more rows and slots
    assert len(running.room_keys[0]) == room_rows(3) and running.capacity == 12 + 6 + SLOT_HEADROOM
    joining = cache((5, 8))
    assert running.fits(joining)
    assert not running.fits(cache((40,)))  # a prompt longer than the batch's slots
    assert not running.fits(cache((5,) * (room_rows(3) - 2)))  # more rows than its room
    few_slots = KVCache(running.keys, running.values, running.valid[:, : running.length + 3], running.positions,
                        running.length, running.room_keys, running.room_values)
    assert not few_slots.fits(joining)  # fewer remaining slots than the joining rows' 6 steps
    expected = KVCache.join(KVCache(running.keys, running.values, running.valid, running.positions,
                                    running.length), joining)  # the same rows without room: copied
    joined = KVCache.join(running, joining)
    assert joined.room_keys is running.room_keys and joined.keys[0].data_ptr() == running.keys[0].data_ptr()
    assert_same(joined, expected)
    storage = joined.room_keys[0].untyped_storage().data_ptr()
    for kept in (joined, expected):
        kept.keep(torch.tensor([0, 2, 4]))
    assert_same(joined, expected)
    assert joined.fits(cache((6,)))
    for kept in (joined, expected):
        kept.keep(torch.tensor([2, 0]))  # an order no row can be moved in row by row
    assert_same(joined, expected)
    assert joined.room_keys[0].untyped_storage().data_ptr() == storage  # kept in its room, not copied out of it


def test_joins_that_do_not_fit_leave_the_cache_s_slots_bounded(tiny_tokenizer) -> None:
    """A batch that rows keep joining with prompts longer than it (copying joins, each adding headroom) holds
    slots for the longest remaining steps and SLOT_HEADROOM, not one more headroom a join."""
    decoder = LlamaDecoder(tiny_speech_llm(tiny_tokenizer).llm)
    torch.manual_seed(7)
    dim = decoder.llm.config.hidden_size
    running = decoder.prefill(*left_pad([torch.randn(4, dim)]), max_new_tokens=6)[1]
    for _ in range(5):
        joining = decoder.prefill(*left_pad([torch.randn(running.length + 1, dim)]), max_new_tokens=6)[1]
        assert not running.fits(joining)
        running = KVCache.join(running, joining)
        assert running.capacity - running.length <= 6 + SLOT_HEADROOM


def test_decoder_for_picks_hugging_face_for_other_architectures(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    assert isinstance(decoder_for(model.llm), LlamaDecoder)
    model.llm.config.use_sliding_window = True  # not implemented by our loop
    assert isinstance(decoder_for(model.llm), HFDecoder)


def test_batched_decode_equals_one_by_one(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    prompts = _prompts(model.llm.config.hidden_size)
    batched = generate(decoder_for(model.llm), prompts, eos_id=-1, max_new_tokens=10)
    alone = [generate(decoder_for(model.llm), [p], eos_id=-1, max_new_tokens=10)[0] for p in prompts]
    assert [h.tokens for h in batched] == [h.tokens for h in alone]


def test_decode_stops_at_eos_and_per_row_limits(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    prompts = _prompts(model.llm.config.hidden_size)
    free = generate(decoder_for(model.llm), prompts, eos_id=-1, max_new_tokens=8)
    eos = free[1].tokens[0]  # pretend row 1's first token is the end-of-text
    limits = [8, 8, 3]
    stopped = generate(decoder_for(model.llm), prompts, eos_id=eos, max_new_tokens=limits)
    for row, limit in enumerate(limits):
        expected = free[row].tokens[: free[row].tokens.index(eos)] if eos in free[row].tokens else free[row].tokens
        assert stopped[row].tokens == expected[:limit]
    assert stopped[1].tokens == []


def test_transcribe_mixed_languages_with_zipper_adapter(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    _random_adapters(model)
    features = torch.randn(3, 80, 120)
    lengths = torch.tensor([120, 100, 80])
    batch = transcribe_features(model, features, lengths, ["en", "ja", None])
    alone = [transcribe_features(model, features[i:i + 1, :, : int(lengths[i])], lengths[i:i + 1],
                                 [lang])[0] for i, lang in enumerate(["en", "ja", None])]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert batch[0].language == "en" and batch[0].detected_language is None
    assert batch[2].detected_language in model.config.languages


@pytest.mark.parametrize("variant", [Variant.SOFT, Variant.INDEPENDENT])
def test_merged_adapters_transcribe_as_the_language_indices_do(tiny_tokenizer, variant: Variant) -> None:
    """transcribe_features(merged=True) decodes as the server does, each row with its language's merged adapter
    (runs of rows of one language, the unknown language's shared subspace too): the same text, and for a Llama-style
    decoder through its packed GEMMs (which carry the GEMM dtype)."""
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=variant, rank=4))
    _random_adapters(model)
    features, lengths = torch.randn(4, 80, 120), torch.tensor([120, 100, 80, 96])
    languages = ["en", "en", None, "ja"]
    decoder = decoder_for(model.llm)
    packed: list[bool] = []
    step = type(decoder).step

    def noting_step(self, *args, **kwargs):
        packed.append(all(p.one_gemm for p in self.qkv))
        return step(self, *args, **kwargs)

    by_index = transcribe_features(model, features, lengths, languages, decoder=decoder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(decoder), "step", noting_step)
        merged = transcribe_features(model, features, lengths, languages, decoder=decoder, merged=True)
    assert [r.text for r in merged] == [r.text for r in by_index]
    assert merged[2].language is None  # (LID not trusted: the shared subspace's adapter)
    assert packed and all(packed) == (variant != Variant.INDEPENDENT)


def test_merged_decoding_of_a_model_without_adapters(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    features, lengths = torch.randn(2, 80, 120), torch.tensor([120, 80])
    merged = transcribe_features(model, features, lengths, ["en", None], merged=True)
    assert [r.text for r in merged] == [r.text for r in transcribe_features(model, features, lengths, ["en", None])]


def _fed(tokens: list[int]) -> tuple[RowTokens, bool]:
    row = RowTokens()
    for token in tokens:
        if row.add(token):
            return row, True
    return row, False


def test_a_repetition_loop_stops_the_row_and_keeps_one_copy() -> None:
    row, looped = _fed([5, 6, 7] + [1, 2, 3] * 10)
    assert looped and row.tokens == [5, 6, 7, 1, 2, 3]
    row, looped = _fed([5] + [9] * 30)
    assert looped and row.tokens == [5, 9]
    row, looped = _fed([8, 1, 2] * 6)  # six copies of "no," are enough
    assert looped and row.tokens == [8, 1, 2]
    row, looped = _fed([4] + list(range(20, 40)) * 3)  # a 20-token phrase three times
    assert looped and row.tokens == [4] + list(range(20, 40))


def test_a_loop_may_begin_in_a_forced_prefix_that_is_never_dropped() -> None:
    prefix = [5] + list(range(20, 30)) * 2  # two copies already sent to a realtime client
    row = RowTokens(context=prefix)
    assert not any(row.add(token) for token in range(20, 29))
    assert row.add(29)  # the third copy, completed by the model, is a loop: none of the new tokens stay
    assert row.tokens == [] and row.settled(finished=True) == []
    row = RowTokens(context=[5, 6])
    assert not row.add(7) and row.tokens == [7] and row.settled(finished=False) == [7]


def test_short_repetitions_are_speech_not_loops() -> None:
    for tokens in ([8, 1, 2] * 5 + [3],  # "no, no, no, no, no."
                   [7] * 10 + [3],  # "ha ha ha ha ha ha ha ha ha ha."
                   list(range(10, 30)) * 2):  # a phrase said twice
        row, looped = _fed(tokens)
        assert not looped and row.tokens == tokens


def test_streamed_tokens_are_never_taken_back() -> None:
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        words = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=rng)),), generator=rng).tolist()
        block = torch.randint(0, 6, (int(torch.randint(1, 8, (1,), generator=rng)),), generator=rng).tolist()
        row, streamed, looped = RowTokens(), [], False
        for token in words + block * 12:
            looped = row.add(token)
            streamed += row.settled(finished=looped)
            assert row.tokens[:len(streamed)] == streamed
            if looped:
                break
        streamed += row.settled(finished=True)
        assert streamed == row.tokens


def test_generate_stops_looping_rows_as_the_guard_cuts_a_free_decode(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer)
    torch.manual_seed(3)
    prompts = [torch.randn(n, model.llm.config.hidden_size) for n in (4, 9, 6, 5)]
    free = generate(decoder_for(model.llm), prompts, eos_id=-1, max_new_tokens=60, stop_loops=False)
    expected = [_fed(h.tokens)[0].tokens for h in free]
    assert any(len(cut) < 60 for cut in expected)  # an untrained model loops: the guard has work to do
    streamed: list[list[int]] = [[] for _ in prompts]
    stopped = generate(decoder_for(model.llm), prompts, eos_id=-1, max_new_tokens=60,
                       on_tokens=lambda emitted: [streamed[row].append(token) for row, token in emitted])
    assert [h.tokens for h in stopped] == expected == streamed


def test_our_decoder_shares_the_model_s_weights_instead_of_copying_them(tiny_tokenizer) -> None:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SOFT, rank=4))
    before = sum(p.numel() for p in model.llm.parameters())
    decoder = LlamaDecoder(model.llm)
    attention = model.llm.model.layers[0].self_attn
    packed = decoder.qkv[0].weight
    storage = packed.untyped_storage().data_ptr()
    for module in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert module.base.weight.untyped_storage().data_ptr() == storage
        assert module.lora_A.untyped_storage().data_ptr() == storage
    with torch.no_grad():
        attention.k_proj.base.weight.add_(1.0)  # an in-place change reaches the packed GEMM
    start, size = attention.q_proj.base.weight.shape[0], attention.k_proj.base.weight.shape[0]
    torch.testing.assert_close(packed[start: start + size], attention.k_proj.base.weight)
    assert sum(p.numel() for p in model.llm.parameters()) == before


def test_left_padding_slots_of_the_kv_cache_never_hold_garbage(tiny_tokenizer, monkeypatch) -> None:
    """A masked slot still enters attention's arithmetic (0 × NaN is NaN): NaN or Inf left in a padding slot by
    whatever used that memory before made a padded row's logits NaN, about 10 steps in each test-split
    evaluation, different ones in every process. Here every uninitialised tensor starts as NaN."""
    model = tiny_speech_llm(tiny_tokenizer)
    torch.manual_seed(2)
    lengths = [5, 80, 6, 4]  # prefilled in two groups: the short rows never write the slots before them
    assert len(length_groups(lengths, PREFILL_CALL_TOKENS)) == 2
    embeds, mask = left_pad([torch.randn(n, model.llm.config.hidden_size) for n in lengths])
    reference = HFDecoder(model.llm).prefill(embeds, mask, max_new_tokens=3)[0]
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *size, **kw: new_empty(self, *size, **kw).fill_(float("nan")))
    decoder = LlamaDecoder(model.llm)
    logits, cache = decoder.prefill(embeds, mask, max_new_tokens=3)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    for _ in range(3):
        logits = decoder.step(logits.argmax(-1), cache)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("seed", range(12))
def test_rows_that_stay_keep_their_places_and_fill_those_of_rows_that_left(seed: int) -> None:
    """kept_in_place: every running row stays, once; one among the first len(running) places stays in its place,
    and one beyond them moves to an earlier place, so that a keep copies only these rows, each after its target
    (adapters.zipper.move_rows)."""
    generator = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 17, (), generator=generator))
    running = sorted(torch.randperm(batch, generator=generator)[: int(torch.randint(1, batch + 1, (),
                                                                                      generator=generator))].tolist())
    order = kept_in_place(running)
    assert sorted(order) == running
    for place, position in enumerate(order):
        assert position == place if place in running else position > place


def test_the_next_token_is_each_row_s_first_largest_as_torch_s_argmax_gives() -> None:
    logprobs = torch.randn(9, 4096).log_softmax(-1)
    logprobs[1, [7, 300]] = 5.0  # a tie: the first
    logprobs[2] = float("-inf")  # no token possible: the first
    logprobs[3, 11] = float("nan")  # a NaN wins, as in torch
    assert torch.equal(_argmax(logprobs), logprobs.argmax(-1))
    assert _argmax(logprobs)[[1, 2, 3]].tolist() == [7, 0, 11]
