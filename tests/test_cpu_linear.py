"""speechllm/cpu_linear.py: linear layers through oneDNN give F.linear's results, follow their weights' changes and
leave training's gradients to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speechllm import cpu_linear
from speechllm.cpu_linear import Linear, OneDNNLinear
from speechllm.decoder import LlamaDecoder
from tests.conftest import tiny_speech_llm


@pytest.mark.skipif(not cpu_linear.ONEDNN, reason="this torch has no oneDNN")
def test_it_runs_on_onednn_and_gives_f_linear_s_results() -> None:
    weight, bias = torch.randn(96, 64), torch.randn(96)
    linear = OneDNNLinear(weight, bias)
    with torch.no_grad():
        for x in (torch.randn(5, 64), torch.randn(3, 7, 64), torch.randn(7, 3, 64).transpose(0, 1), torch.randn(64)):
            torch.testing.assert_close(linear(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert linear._laid_out is not None and linear._laid_out.is_mkldnn  # it did not fall back to F.linear


def test_the_laid_out_weight_follows_changes_to_its_sources() -> None:
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)  # lays the weight out
        layer.weight.add_(1.0)  # in place, as an optimizer step
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.weight.data = torch.randn(8, 16)  # new memory, same version
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


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


def test_the_decoder_s_packed_gemm_follows_its_modules_weights(tiny_tokenizer) -> None:
    """The decoder lays its packed q/k/v weights out once: an in-place change to one module's weight after that
    must still reach the logits."""
    model = tiny_speech_llm(tiny_tokenizer)
    decoder = LlamaDecoder(model.llm)
    embeds = torch.randn(2, 5, model.llm.config.hidden_size)
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        before, _ = decoder.prefill(embeds, mask, max_new_tokens=1)
        model.llm.model.layers[0].self_attn.v_proj.weight.mul_(3.0)
        after, _ = decoder.prefill(embeds, mask, max_new_tokens=1)
        expected = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
