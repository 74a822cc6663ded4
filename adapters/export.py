"""Per-language export of a Zipper adapter: B(l) with the shared A is an ordinary rank-r LoRA.

- `export_peft`: PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`), which
  the `peft` library and vLLM (`LoRARequest`) load without conversion.
- `fold_into_base`: W0 + (α/r) B(l) A added into a copy of the base weights, for a single-language
  deployment with no adapter at run time.
- `export_model_adapters`: every language of a model directory, stamped with `export_fingerprint`, so
  that exports left behind by an older model or exporter are recognised as stale.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from adapters import zipper
from adapters.zipper import ZipperConfig, is_adapter_tensor, merge_language, zipper_layers


def _language_loras(llm: nn.Module, language: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (HF naming, without ".base") → (A, B(l)) for one language."""
    merged = merge_language(llm, language)
    loras = {}
    for (name, layer), b in zip(zipper_layers(llm), merged.b, strict=True):
        a = merged.a[layer.index] if merged.a is not None else layer.lora_A
        loras[name] = (a.detach(), b.detach())
    return loras


def export_peft(llm: nn.Module, config: ZipperConfig, language: int | None, out_dir: str | Path,
                base_model_path: str = "", dtype: torch.dtype = torch.float32) -> Path:
    """Write language `language` (None: the shared subspace alone) as a PEFT LoRA adapter directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in _language_loras(llm, language).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, out_dir / "adapter_model.safetensors")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(config.target_modules), "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return out_dir


@torch.no_grad()
def fold_into_base(llm: nn.Module, config: ZipperConfig, language: int | None) -> dict[str, torch.Tensor]:
    """The base LLM's state dict (HF names) with language `language`'s update folded into W0."""
    folded = {name.replace(".base.", "."): t.clone() for name, t in llm.state_dict().items()
              if not is_adapter_tensor(name)}
    for name, (a, b) in _language_loras(llm, language).items():
        folded[f"{name}.weight"] += config.scaling * (b @ a)
    return folded


SHARED_ADAPTER = "shared"  # the directory of the shared subspace alone (unknown languages)
EXPORT_STAMP = ".exported-from"  # in an exports directory: the export_fingerprint it was written for


def export_fingerprint(model_dir: str | Path) -> str:
    """What a model directory's exports are a function of: its config and Zipper weights, and the code that
    merges and writes them. (Not the torch build: another BLAS may round the last bit of B(l) differently,
    which no transcript notices, and a GPU image would otherwise never trust exports made on the host.)"""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for source in (model_dir / "config.json", model_dir / "adapter.safetensors", Path(__file__),
                   Path(zipper.__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def export_stamp(exports_dir: str | Path) -> str | None:
    """The fingerprint an exports directory was written for; None if `export_model_adapters` did not write
    it (adapters trained or exported elsewhere)."""
    stamp = Path(exports_dir) / EXPORT_STAMP
    return stamp.read_text().strip() if stamp.exists() else None


def export_model_adapters(model_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Export a model directory's Zipper adapter per language into OUT/<language>/ (default
    MODEL/adapters), plus OUT/shared/ for the shared subspace alone, and stamp OUT. Float32: exactly the
    B(l) that the embedded engine merges (B(l) mixes float16 weights with gates, so float16 would round
    it). A previous export of ours in OUT is replaced whole, so no language a newer model lacks stays."""
    from speechllm.model import SpeechLLM

    model = SpeechLLM.load(model_dir)
    config = model.config.adapter
    if config is None:
        raise ValueError(f"{model_dir} has no adapter to export")
    out_dir = Path(out_dir) if out_dir is not None else Path(model_dir) / "adapters"
    if export_stamp(out_dir) is not None:
        shutil.rmtree(out_dir)
    base = str(Path(model_dir) / "llm")
    exported = [export_peft(model.llm, config, index, out_dir / code, base)
                for index, code in enumerate(model.config.languages)]
    exported.append(export_peft(model.llm, config, None, out_dir / SHARED_ADAPTER, base))
    (out_dir / EXPORT_STAMP).write_text(export_fingerprint(model_dir) + "\n")
    return exported
