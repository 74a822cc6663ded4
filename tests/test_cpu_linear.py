"""speechllm/cpu_linear.py: linear layers through oneDNN give F.linear's results, follow their weights' changes and
leave training (gradients, autocast) to F.linear."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speechllm import cpu_linear
from speechllm.cpu_linear import Linear, OneDNNLinear, resolve_gemm_dtype, set_gemm_dtype
from speechllm.decoder import LlamaDecoder
from speechllm.model import SpeechLLM, load_speech_half
from tests.conftest import tiny_speech_llm

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


@pytest.mark.skipif(not cpu_linear.ONEDNN, reason="this torch has no oneDNN")
def test_it_runs_on_onednn_and_gives_f_linear_s_results() -> None:
    weight, bias = torch.randn(96, 64), torch.randn(96)
    linear = OneDNNLinear(weight, bias)
    with torch.no_grad():
        for x in (torch.randn(5, 64), torch.randn(3, 7, 64), torch.randn(7, 3, 64).transpose(0, 1), torch.randn(64)):
            torch.testing.assert_close(linear(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert linear._laid_out is not None and linear._laid_out.is_mkldnn  # it did not fall back to F.linear


ON_ONEDNN = pytest.mark.skipif(not cpu_linear.ONEDNN, reason="this torch has no oneDNN")


@ON_ONEDNN
def test_an_unchecked_call_runs_as_the_last_checked_one() -> None:
    """LlamaDecoder's steps skip the checks: they run as the generation's prefill did, weights changed or not."""
    weight, bias = torch.randn(8, 4), torch.randn(8)
    linear, x = OneDNNLinear(weight, bias), torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, checked=False), F.linear(x, weight, bias))  # nothing checked yet
        assert linear._laid_out is None
        linear(x)
        laid_out = linear._laid_out
        assert laid_out is not None
        weight.mul_(2)
        torch.testing.assert_close(linear(x, checked=False), F.linear(x, weight / 2, bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)  # checked: seen
        assert linear._laid_out is not laid_out


@ON_ONEDNN
def test_the_laid_out_weight_follows_changes_to_its_sources() -> None:
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)  # lays the weight out
        assert layer._onednn._laid_out is not None
        layer.weight.add_(1.0)  # in place, as an optimizer step
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        for _ in range(20):  # new memory, the same version; twice, so that the old address could come back
            layer.weight.data = torch.randn(8, 16)
            layer.weight.data = torch.randn(8, 16)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.weight.data.mul_(2.0)  # no version counter sees this write: reset() says so
        layer._onednn.reset()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@ON_ONEDNN
def test_a_weight_that_becomes_unfit_after_it_was_laid_out_goes_to_f_linear() -> None:
    """What concerns only the weights is checked when they are laid out: a weight given other memory (here an
    inference tensor, which has no version counter) is checked again before it is used, not run stale."""
    layer = Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
        assert layer._onednn._laid_out is not None
        with torch.inference_mode():
            weight = torch.randn(8, 16)
        layer.weight.data = weight
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias))


@ON_ONEDNN
def test_autocast_and_inference_tensors_go_to_f_linear() -> None:
    """Training runs its frozen encoder under bf16 autocast, which does not reach oneDNN's op; a model made under
    inference_mode has no version counters."""
    layer = Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with torch.inference_mode():
        made_there = Linear(16, 8)
        torch.testing.assert_close(made_there(x), F.linear(x, made_there.weight, made_there.bias))
    assert made_there._onednn._laid_out is None


@ON_ONEDNN
def test_a_layer_that_ran_on_onednn_can_be_copied_and_pickled() -> None:
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = layer(x)
        for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            torch.testing.assert_close(copied(x), expected)


def test_training_gets_gradients() -> None:
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()
    reference = torch.nn.Linear(16, 8)
    reference.load_state_dict(layer.state_dict())
    x_reference = x.detach().clone().requires_grad_()
    reference(x_reference).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(x.grad, x_reference.grad)


def _tiny_decoder_and_prompts(tokenizer) -> tuple:
    """A tiny Speech-LLM, its LlamaDecoder, and two prompts of 5 embeddings with their mask."""
    model = tiny_speech_llm(tokenizer)
    return (model, LlamaDecoder(model.llm), torch.randn(2, 5, model.llm.config.hidden_size),
            torch.ones(2, 5, dtype=torch.long))


@ON_ONEDNN
def test_the_decoder_s_packed_gemm_follows_its_modules_weights(tiny_tokenizer) -> None:
    """The decoder lays its packed q/k/v weights out once: an in-place change to one module's weight after that
    must still reach the logits."""
    model, decoder, embeds, mask = _tiny_decoder_and_prompts(tiny_tokenizer)
    with torch.no_grad():
        before, _ = decoder.prefill(embeds, mask, max_new_tokens=1)
        model.llm.model.layers[0].self_attn.v_proj.weight.mul_(3.0)
        after, _ = decoder.prefill(embeds, mask, max_new_tokens=1)
        expected = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert decoder.qkv[0].linear._laid_out is not None and decoder.lm_head._laid_out is not None


BF16 = pytest.mark.skipif(not cpu_linear.native_bf16(), reason="this CPU has no bf16 instructions")


@BF16
def test_bf16_gemms_round_the_inputs_and_weights_and_switch_back_to_exact_float32() -> None:
    """In bf16 a layer gives what float32 gives on bf16-rounded inputs and weights (accumulated in float32, then
    rounded to bf16), and a layer set back to float32 lays its weight out again and is exact."""
    torch.manual_seed(0)
    layer = Linear(64, 48)
    x = torch.randn(6, 64)
    with torch.no_grad():
        exact = F.linear(x, layer.weight, layer.bias)
        set_gemm_dtype(layer, torch.bfloat16)
        rounded = layer(x)
        assert layer._onednn._laid_out.dtype is torch.bfloat16 and rounded.dtype == torch.float32
        of_rounded = F.linear(x.bfloat16().float(), layer.weight.bfloat16().float(), layer.bias)
        torch.testing.assert_close(rounded, of_rounded, atol=1e-6, rtol=2 ** -7)  # the output's rounding, no more
        assert not torch.allclose(rounded, exact, atol=1e-5, rtol=1e-5)
        set_gemm_dtype(layer, torch.float32)
        torch.testing.assert_close(layer(x), exact, atol=1e-5, rtol=1e-5)
        assert layer._onednn._laid_out.dtype is torch.float32


@BF16
def test_a_bf16_layer_hands_its_output_on_in_bf16_with_the_same_numbers() -> None:
    """`output_in_gemm_dtype` (the encoder's feed-forward): the first layer's bf16 output stays bf16, the next bf16
    layer takes it as it is, and the pair with a GELU between gives what it gives when the output is made float32
    and rounded again; in float32 the flag changes nothing."""
    torch.manual_seed(0)
    first, second = Linear(64, 256), Linear(256, 48)
    x = torch.randn(40, 64)
    with torch.no_grad():
        set_gemm_dtype(first, torch.bfloat16)
        set_gemm_dtype(second, torch.bfloat16)
        through_float32 = second(F.gelu(first(x)))
        first.output_in_gemm_dtype = True
        hidden = first(x)
        assert hidden.dtype is torch.bfloat16
        out = second(F.gelu(hidden))
        assert out.dtype is torch.float32 and torch.equal(out, through_float32)
        set_gemm_dtype(first, torch.float32)
        assert first(x).dtype is torch.float32


@BF16
def test_the_decoder_s_layers_take_a_gemm_dtype(tiny_tokenizer) -> None:
    _, decoder, embeds, mask = _tiny_decoder_and_prompts(tiny_tokenizer)
    with torch.no_grad():
        exact, _ = decoder.prefill(embeds, mask, max_new_tokens=1)
        decoder.set_gemm_dtype(torch.bfloat16)
        rounded, _ = decoder.prefill(embeds, mask, max_new_tokens=1)
        assert decoder.qkv[0].linear._laid_out.dtype is torch.bfloat16
        assert decoder.lm_head._laid_out.dtype is torch.bfloat16
        assert not torch.allclose(rounded, exact, atol=1e-5) and float((rounded - exact).norm() / exact.norm()) < 0.05
        decoder.set_gemm_dtype(torch.float32)
        torch.testing.assert_close(decoder.prefill(embeds, mask, max_new_tokens=1)[0], exact)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        decoder.set_gemm_dtype(torch.float16)


@BF16
def test_calls_of_more_than_a_step_s_rows_take_the_wide_gemm_dtype() -> None:
    """`wide_gemm_dtype`: calls of more than EXACT_ROWS rows (a decoder's prompts) in bf16, a step's rows in float32,
    checked or not; the bf16 weight is laid out again when the weight changes."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    linear = OneDNNLinear(weight, bias)
    linear.wide_gemm_dtype = torch.bfloat16
    step, prompts = torch.randn(cpu_linear.EXACT_ROWS, 64), torch.randn(cpu_linear.EXACT_ROWS + 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear(step), F.linear(step, weight, bias), atol=1e-5, rtol=1e-5)
        for checked in (True, False):
            wide = linear(prompts, checked)
            of_rounded = F.linear(prompts.bfloat16().float(), weight.bfloat16().float(), bias)
            torch.testing.assert_close(wide, of_rounded, atol=1e-6, rtol=2 ** -7)
            assert not torch.allclose(wide, F.linear(prompts, weight, bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(step, checked=False), F.linear(step, weight, bias), atol=1e-5, rtol=1e-5)
        weight.mul_(-1)
        of_rounded = F.linear(prompts.bfloat16().float(), weight.bfloat16().float(), bias)
        torch.testing.assert_close(linear(prompts), of_rounded, atol=1e-6, rtol=2 ** -7)


@BF16
def test_the_decoder_s_prompts_alone_can_take_bf16(tiny_tokenizer) -> None:
    """LlamaDecoder.set_gemm_dtype(float32, wide=bf16): a prefill of more than 16 rows in bf16, a step in float32."""
    _, decoder, embeds, mask = _tiny_decoder_and_prompts(tiny_tokenizer)
    embeds = torch.cat([embeds] * 4, dim=1)  # prompts of more rows than a step's
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 3 * mask.shape[1])], dim=1)
    with torch.no_grad():
        exact, _ = decoder.prefill(embeds, mask, max_new_tokens=2)
        decoder.set_gemm_dtype(torch.float32, wide=torch.bfloat16)
        rounded, cache = decoder.prefill(embeds, mask, max_new_tokens=2)
        assert not torch.allclose(rounded, exact, atol=1e-5) and float((rounded - exact).norm() / exact.norm()) < 0.05
        twin = copy.deepcopy(cache)
        stepped = decoder.step(rounded.argmax(-1), cache)
        decoder.set_gemm_dtype(torch.float32)
        torch.testing.assert_close(decoder.step(rounded.argmax(-1), twin), stepped, atol=0, rtol=0)


def test_auto_is_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(cpu_linear, "native_bf16", lambda native=native: native)
        assert resolve_gemm_dtype("auto") is expected
    assert resolve_gemm_dtype("float32") is torch.float32 and resolve_gemm_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown GEMM dtype"):
        resolve_gemm_dtype("float16")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        set_gemm_dtype(Linear(4, 4), torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        OneDNNLinear(torch.randn(4, 4), gemm_dtype=torch.float16)


def test_a_loaded_model_s_encoder_alone_gets_bf16_gemms() -> None:
    """`SpeechLLM.load(encoder_gemm_dtype=...)` and `load_speech_half` set the speech encoder's layers only: the
    projector, the LID and CTC heads stay float32 (the decoder's layers are its own: LlamaDecoder.set_gemm_dtype)."""
    model = SpeechLLM.load(MODEL_DIR, encoder_gemm_dtype=torch.bfloat16)
    in_encoder = {id(m) for m in model.encoder.modules()}
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert any(id(m) in in_encoder for m in layers) and any(id(m) not in in_encoder for m in layers)
    for layer in layers:
        assert layer.gemm_dtype is (torch.bfloat16 if id(layer) in in_encoder else torch.float32)
    half = load_speech_half(MODEL_DIR, torch.bfloat16)  # an audio worker's: all of the model's layers of ours
    half_encoder = {id(m) for m in half.encoder.modules()}
    half_layers = [m for m in half.modules() if isinstance(m, Linear)]
    assert len(half_layers) == len(layers)
    for layer in half_layers:
        assert layer.gemm_dtype is (torch.bfloat16 if id(layer) in half_encoder else torch.float32)
    assert {m.gemm_dtype for m in SpeechLLM.load(MODEL_DIR).modules() if isinstance(m, Linear)} == {torch.float32}


def test_row_counts_above_a_step_s_go_up_to_a_few_sizes_per_octave() -> None:
    padded = [cpu_linear.padded_rows(rows) for rows in range(1, 4097)]
    assert padded[:cpu_linear.EXACT_ROWS] == list(range(1, cpu_linear.EXACT_ROWS + 1))
    assert all(rows <= p <= rows * 1.125 for rows, p in enumerate(padded, 1))
    assert len(set(padded)) == cpu_linear.EXACT_ROWS + 8 * 8  # 16 → 4096: eight octaves of eight sizes


@ON_ONEDNN
@pytest.mark.parametrize("gemm_dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_give_the_same_results_as_the_rows_alone(gemm_dtype: torch.dtype,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    linear = OneDNNLinear(torch.randn(768, 256), torch.randn(768), gemm_dtype=gemm_dtype)
    gemm, ran_with = linear._gemm, []

    def recorded_gemm(x: torch.Tensor, laid_out: torch.Tensor) -> torch.Tensor:
        ran_with.append(x.numel() // x.shape[-1])
        return gemm(x, laid_out)

    monkeypatch.setattr(linear, "_gemm", recorded_gemm)
    with torch.no_grad():
        for x, padded in ((torch.randn(17, 256), 18), (torch.randn(3, 100, 256), 320), (torch.randn(301, 256), 320)):
            out = linear(x)
            assert ran_with[-1] == padded and out.shape == (*x.shape[:-1], 768)
            assert torch.equal(out, gemm(x, linear._last_choice))  # the zeros change nothing, bit for bit


# In a fresh process: how much one layer called with every row count from 1 to 599 grows the process (oneDNN keeps a
# primitive, compiled kernels included, for every input shape).
GROWTH_OVER_ROW_COUNTS = """
import resource, sys, torch
from speechllm import cpu_linear
if sys.argv[1] == "exact":
    cpu_linear.padded_rows = lambda rows: rows
layer = cpu_linear.OneDNNLinear(torch.randn(768, 256), torch.zeros(768))
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
with torch.no_grad():
    layer(torch.randn(1, 256))
    before = resident_mb()
    for rows in range(1, 600):
        layer(torch.randn(rows, 256))
print(resident_mb() - before)
"""


@ON_ONEDNN
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_a_layer_called_with_every_length_keeps_a_bounded_number_of_primitives() -> None:
    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", GROWTH_OVER_ROW_COUNTS, mode], capture_output=True, text=True,
                             check=True, cwd=MODEL_DIR.parent.parent)
        return float(out.stdout)

    exact, padded = growth("exact"), growth("padded")
    assert exact > 100  # about 0.6 MB a row count (its primitive) without the padding
    assert padded < exact / 4
