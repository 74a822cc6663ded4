"""Exported per-language adapters equal the Zipper layer for that language: loaded by `peft` onto
the plain HF LLM, and folded into the base weights."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.export import export_peft, fold_into_base
from adapters.zipper import Variant, ZipperConfig, use_languages
from tests.conftest import tiny_speech_llm

peft = pytest.importorskip("peft")


def _trained_looking(tokenizer, variant: Variant):
    model = tiny_speech_llm(tokenizer, adapter=ZipperConfig(variant=variant, rank=4, alpha=8.0))
    torch.manual_seed(7)
    for name, param in model.llm.named_parameters():
        if "lora_" in name or "router" in name or "language_embedding" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


@pytest.mark.parametrize("variant", [Variant.SHARED, Variant.STATIC, Variant.HARD, Variant.SOFT, Variant.INDEPENDENT])
def test_peft_and_folded_weights_equal_the_zipper_layer(tiny_tokenizer, tmp_path: Path, variant: Variant) -> None:
    model = _trained_looking(tiny_tokenizer, variant)
    model.save(tmp_path / "m", dtype=torch.float32)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    language = 9  # ja
    with torch.no_grad(), use_languages(model.llm, torch.tensor([language, language])):
        zipper_logits = model.llm(input_ids=ids).logits

    adapter_dir = export_peft(model.llm, model.config.adapter, language, tmp_path / "ja")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "llm", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    assert (peft_logits - zipper_logits).abs().max() <= 1e-5

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "llm", dtype=torch.float32)
    plain.load_state_dict(fold_into_base(model.llm, model.config.adapter, language), strict=False)
    with torch.no_grad():
        folded_logits = plain.eval()(input_ids=ids).logits
    assert (folded_logits - zipper_logits).abs().max() <= 1e-5
