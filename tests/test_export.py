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


def test_a_model_directory_exports_every_language_and_the_shared_subspace(tiny_tokenizer, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from adapters.export import SHARED_ADAPTER, export_model_adapters
    from adapters.zipper import merge_language, zipper_layers

    model = _trained_looking(tiny_tokenizer, Variant.SOFT)
    model.save(tmp_path / "m", dtype=torch.float32)
    exported = export_model_adapters(tmp_path / "m")
    assert [p.name for p in exported] == [*model.config.languages, SHARED_ADAPTER]
    assert all(p.parent == tmp_path / "m" / "adapters" for p in exported)
    ja = load_file(tmp_path / "m" / "adapters" / "ja" / "adapter_model.safetensors")
    name, _ = next(zipper_layers(model.llm))
    b_ja = merge_language(model.llm, model.config.languages.index("ja")).b[0]
    assert all(t.dtype == torch.float32 for t in ja.values())
    assert torch.equal(ja[f"base_model.model.{name}.lora_B.weight"], b_ja)  # what the embedded engine merges


def test_a_new_export_replaces_a_stale_one_whole(tiny_tokenizer, tmp_path: Path) -> None:
    from adapters.export import export_fingerprint, export_model_adapters, export_stamp

    model = _trained_looking(tiny_tokenizer, Variant.SOFT)
    model.save(tmp_path / "m", dtype=torch.float16)
    out = tmp_path / "m" / "adapters"
    export_model_adapters(tmp_path / "m")
    (out / "xx").mkdir()  # a language an older model had
    (out / ".exported-from").write_text("an older model\n")
    assert export_stamp(out) != export_fingerprint(tmp_path / "m")
    export_model_adapters(tmp_path / "m")
    assert not (out / "xx").exists() and export_stamp(out) == export_fingerprint(tmp_path / "m")
