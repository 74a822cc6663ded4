"""The Speech-LLM: speech encoder → projector → decoder-only LLM, plus a language-ID head.

A model directory holds:

    config.json           SpeechLLMConfig (encoder, projector, adapter settings)
    speech.safetensors    encoder (when it is ours), projector and LID head
    llm/                  a standard Hugging Face causal LM directory with tokenizer.json
    adapter.safetensors   the Zipper-LoRA tensors on top of llm/ (optional)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters.zipper import Variant, ZipperConfig, adapter_state_dict, inject, is_adapter_tensor
from speechllm.cpu_linear import Linear, set_gemm_dtype
from speechllm.encoder import EncoderConfig, SpeechEncoder
from speechllm.hf_encoder import HFWhisperEncoder
from speechllm.languages import LANGUAGE_CODES
from speechllm.prompt import ensure_special_tokens, prompt_suffix_ids


@dataclass
class SpeechLLMConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # "zipper": our encoder (weights in speech.safetensors); "hf-whisper": a local HF Whisper directory.
    encoder_kind: str = "zipper"
    encoder_path: str | None = None  # for hf-whisper, relative to the model directory
    stack_frames: int = 2  # encoder frames stacked per LLM input embedding (40 ms → 80 ms)
    # CTC compression: a CTC head (from encoder pretraining) marks the frames where a character is
    # spoken; blank frames are dropped and each run of one label is averaged into one frame, so the
    # LLM reads about one audio embedding per character, in order (0: off, frames are stacked instead).
    ctc_symbols: int = 0
    soft_spelling: bool = False  # with ctc_symbols: add CTC posteriors × symbol embeddings (Projector)
    languages: tuple[str, ...] = LANGUAGE_CODES
    adapter: ZipperConfig | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["languages"] = list(self.languages)
        if self.adapter is not None:
            data["adapter"]["variant"] = self.adapter.variant.value
            data["adapter"]["target_modules"] = list(self.adapter.target_modules)
        return data

    @classmethod
    def from_json(cls, data: dict) -> SpeechLLMConfig:
        data = dict(data)
        data["encoder"] = EncoderConfig(**data["encoder"])
        data["languages"] = tuple(data["languages"])
        if data.get("adapter"):
            adapter = dict(data["adapter"])
            adapter["variant"] = Variant(adapter["variant"])
            adapter["target_modules"] = tuple(adapter["target_modules"])
            data["adapter"] = ZipperConfig(**adapter)
        return cls(**data)


class Projector(nn.Module):
    """Map encoder frames into the LLM's embedding space.

    Without CTC compression neighbouring frames are stacked and go through an MLP. With it
    (`n_symbols` > 0) each compressed frame stands for about one character, and the MLP's output is
    added to a soft spelling: the frame's CTC posteriors times an embedding per CTC symbol,
    initialised from the LLM's own character embeddings (`start_from_spelling`), which the LLM
    learnt to read in pretraining (speechllm/prompt.py)."""

    def __init__(self, encoder_dim: int, llm_dim: int, stack: int, n_symbols: int = 0) -> None:
        super().__init__()
        self.stack = stack
        self.net = nn.Sequential(Linear(encoder_dim * stack, llm_dim), nn.GELU(), Linear(llm_dim, llm_dim))
        self.symbol_embeddings = nn.Embedding(n_symbols, llm_dim) if n_symbols else None

    def forward(self, states: torch.Tensor, lengths: torch.Tensor, symbol_logits: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
        states = states * valid[..., None].to(states.dtype)  # a row's last stack must not see padding
        states = F.pad(states, (0, 0, 0, -states.shape[1] % self.stack))
        batch, length, dim = states.shape
        embeddings = self.net(states.reshape(batch, length // self.stack, dim * self.stack))
        if self.symbol_embeddings is not None and symbol_logits is not None:
            embeddings = embeddings + symbol_logits.softmax(-1) @ self.symbol_embeddings.weight
        return embeddings, torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    @torch.no_grad()
    def start_from_spelling(self, symbol_embeddings: torch.Tensor) -> None:
        """Begin as a pure soft spelling: the symbol table from the LLM, the MLP's output zero."""
        self.symbol_embeddings.weight.copy_(symbol_embeddings)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)


def ctc_compress(states: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop frames whose CTC label is blank (0) and average each run of one repeated label into one
    frame. A row with no labelled frame keeps the mean of its frames, so no prompt is empty."""
    rows = []
    for row in range(states.shape[0]):
        length = int(lengths[row])
        row_labels = labels[row, :length]
        boundaries = torch.ones(length, dtype=torch.bool, device=states.device)
        boundaries[1:] = row_labels[1:] != row_labels[:-1]
        run_ids = boundaries.cumsum(0) - 1
        n_runs = int(run_ids[-1]) + 1 if length else 0
        sums = states.new_zeros(n_runs, states.shape[-1]).index_add_(0, run_ids, states[row, :length])
        counts = torch.bincount(run_ids, minlength=n_runs).clamp(min=1).to(states.dtype)
        keep = row_labels[boundaries] != 0
        kept = (sums / counts[:, None])[keep]
        rows.append(kept if len(kept) else states[row, :max(length, 1)].mean(0, keepdim=True))
    new_lengths = torch.tensor([len(r) for r in rows], device=lengths.device)
    out = states.new_zeros(len(rows), int(new_lengths.max()), states.shape[-1])
    for row, kept in enumerate(rows):
        out[row, : len(kept)] = kept
    return out, new_lengths


class LIDHead(nn.Module):
    """Language ID from mean-pooled encoder states."""

    def __init__(self, encoder_dim: int, n_languages: int) -> None:
        super().__init__()
        self.net = nn.Sequential(Linear(encoder_dim, encoder_dim), nn.GELU(), Linear(encoder_dim, n_languages))

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).to(states.dtype)
        pooled = (states * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.net(pooled)


@dataclass
class HeardWindow:
    """What the speech half makes of one window of audio: all that the language choice and the decoder's prompt
    need of it."""

    language_probabilities: torch.Tensor  # (languages,) LID posteriors, float32, on the CPU
    audio: torch.Tensor  # (positions, llm_dim): the prompt's audio embeddings (speechllm/prompt.py)
    frames: int  # the length of its encoder states (LID over a recording weighs its windows by it)

    def to(self, device: torch.device | str) -> HeardWindow:
        """With its audio embeddings on `device` (the posteriors stay on the CPU)."""
        return HeardWindow(self.language_probabilities, self.audio.to(device), self.frames)


class SpeechHalf(nn.Module):
    """The speech half of the Speech-LLM: encoder, projector, CTC and LID heads. On its own (`load_speech_half`)
    in processes that turn audio into prompts and nothing else: the server's audio workers."""

    def __init__(self, config: SpeechLLMConfig, llm_dim: int, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else SpeechEncoder(config.encoder)
        stack = 1 if config.ctc_symbols else config.stack_frames
        self.projector = Projector(self.encoder.output_dim, llm_dim, stack,
                                   config.ctc_symbols if config.soft_spelling else 0)
        self.ctc_head = Linear(self.encoder.output_dim, config.ctc_symbols) if config.ctc_symbols else None
        self.lid_head = LIDHead(self.encoder.output_dim, len(config.languages))

    def encode(self, features: torch.Tensor, feature_lengths: torch.Tensor,
               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(features, feature_lengths, chunk_size=chunk_size)

    def audio_embeddings(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ctc_head is None:
            return self.projector(states, lengths)
        states, lengths = ctc_compress(states, lengths, self.ctc_head(states).argmax(-1))
        return self.projector(states, lengths, self.ctc_head(states))

    def language_logits(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.lid_head(states, lengths)

    @torch.no_grad()
    def hear(self, states: list[torch.Tensor]) -> list[HeardWindow]:
        """Windows' encoder states (frames, d) → their LID posteriors and audio embeddings, in one batch."""
        lengths = torch.tensor([len(row) for row in states], device=states[0].device)
        padded = nn.utils.rnn.pad_sequence(states, batch_first=True)
        probabilities = self.language_logits(padded, lengths).float().softmax(-1).cpu()
        audio, audio_lengths = self.audio_embeddings(padded, lengths)
        return [HeardWindow(probabilities[row], audio[row, : int(audio_lengths[row])], len(states[row]))
                for row in range(len(states))]


class SpeechLLM(SpeechHalf):
    """The speech half and the decoder LLM (with its Zipper adapters, when the model has them)."""

    def __init__(self, config: SpeechLLMConfig, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 encoder: nn.Module | None = None) -> None:
        super().__init__(config, llm.get_input_embeddings().embedding_dim, encoder)
        ensure_special_tokens(tokenizer, llm)
        self.llm = llm
        self.tokenizer = tokenizer
        if config.adapter is not None:
            inject(self.llm, config.adapter)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def prompt(self, audio: torch.Tensor, language: str | None) -> torch.Tensor:
        """One row's prompt (length, dim): its audio embeddings (positions, dim), then the task and language tokens."""
        suffix = torch.tensor(prompt_suffix_ids(self.tokenizer, language), device=audio.device)
        return torch.cat([audio, self.embed_tokens(suffix)])

    def prompt_embeddings(self, audio: torch.Tensor, audio_lengths: torch.Tensor,
                          languages: list[str | None]) -> list[torch.Tensor]:
        """One prompt per row of padded audio embeddings (`prompt`)."""
        return [self.prompt(audio[row, : audio_lengths[row]], language) for row, language in enumerate(languages)]

    def language_indices(self, languages: list[str | None]) -> torch.Tensor:
        """Adapter table rows for these languages (unknown → row 0 is never used: see adapters)."""
        return torch.tensor([self.config.languages.index(code) if code else -1 for code in languages])

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        directory = Path(directory)
        (directory / "llm").mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        speech = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        speech |= {f"lid_head.{k}": v for k, v in self.lid_head.state_dict().items()}
        if self.ctc_head is not None:
            speech |= {f"ctc_head.{k}": v for k, v in self.ctc_head.state_dict().items()}
        if self.config.encoder_kind == "zipper":
            speech |= {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        else:
            self.encoder.save(directory / str(self.config.encoder_path))
        save_file(_cast(speech, dtype), directory / "speech.safetensors")
        base = base_llm_state_dict(self.llm)
        self.llm.save_pretrained(directory / "llm", state_dict=_cast(base, dtype))
        self.tokenizer.save_pretrained(directory / "llm")
        if self.config.adapter is not None:
            save_file(_cast(adapter_state_dict(self.llm), dtype), directory / "adapter.safetensors")

    @classmethod
    def assemble(cls, config: SpeechLLMConfig, llm_dir: str | Path, encoder_dir: str | Path | None = None
                 ) -> SpeechLLM:
        """A new Speech-LLM from pretrained parts: any HF causal LM directory (with its tokenizer) and,
        for `encoder_kind="hf-whisper"`, a local Whisper directory; projector and LID head are new."""
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        encoder = None
        if config.encoder_kind == "hf-whisper":
            encoder = HFWhisperEncoder.from_directory(encoder_dir)
            config.encoder_path = "encoder"
        return cls(config, llm, tokenizer, encoder)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             adapter: ZipperConfig | None = None, encoder_gemm_dtype: torch.dtype = torch.float32) -> SpeechLLM:
        """Load a model directory. `adapter` replaces the saved adapter with a new, untrained one of that
        configuration (stage-2 training warm-starts it from the saved one). `encoder_gemm_dtype`: the speech
        encoder's GEMMs on a CPU (speechllm.cpu_linear; the weights stay float32)."""
        directory = Path(directory)
        config, encoder = _config_and_encoder(directory)
        saved_adapter = config.adapter is not None and adapter is None
        if adapter is not None:
            config.adapter = adapter
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory / "llm")
        model = cls(config, llm, tokenizer, encoder)
        _load_speech(model, load_file(directory / "speech.safetensors"), directory, encoder_gemm_dtype)
        if saved_adapter:
            tensors = load_file(directory / "adapter.safetensors")
            if set(tensors) != set(adapter_state_dict(model.llm)):
                raise ValueError(f"{directory}/adapter.safetensors does not match the adapter in config.json")
            model.llm.load_state_dict(_float(tensors), strict=False)
        return model.to(device).eval()


def load_speech_half(directory: str | Path, encoder_gemm_dtype: torch.dtype = torch.float32) -> SpeechHalf:
    """Only the speech half of a model directory (for processes that turn audio into prompts and nothing else), as
    `SpeechLLM.load` gives it."""
    directory = Path(directory)
    config, encoder = _config_and_encoder(directory)
    speech = load_file(directory / "speech.safetensors")
    projector_out = "projector.net.2.weight"  # the projector's output layer: its rows are the LLM's embedding width
    if projector_out not in speech:
        raise ValueError(f"{directory}/speech.safetensors lacks {projector_out}")
    half = SpeechHalf(config, speech[projector_out].shape[0], encoder)
    _load_speech(half, speech, directory, encoder_gemm_dtype)
    return half.eval()


def _config_and_encoder(directory: Path) -> tuple[SpeechLLMConfig, nn.Module | None]:
    """A model directory's configuration, and its Hugging Face encoder when it has one (ours is built from the
    configuration, its weights in speech.safetensors)."""
    config = SpeechLLMConfig.from_json(json.loads((directory / "config.json").read_text()))
    if config.encoder_kind == "hf-whisper":
        return config, HFWhisperEncoder.from_directory(directory / str(config.encoder_path))
    return config, None


def _load_speech(model: SpeechHalf, speech: dict[str, torch.Tensor], directory: Path,
                 encoder_gemm_dtype: torch.dtype) -> None:
    """speech.safetensors' tensors into the speech half, checked, with the encoder's GEMMs in `encoder_gemm_dtype`
    (speechllm.cpu_linear; the weights stay float32)."""
    model.load_state_dict(_float(speech), strict=False)  # the LLM's and a Hugging Face encoder's come from elsewhere
    _check_loaded(model, speech, directory)
    set_gemm_dtype(model.encoder, encoder_gemm_dtype)


def base_llm_state_dict(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's own weights under their Hugging Face names, without any adapter tensors."""
    state = {}
    for name, tensor in llm.state_dict().items():
        if not is_adapter_tensor(name):
            state[name.replace(".base.", ".")] = tensor
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding matrix: loaders tie it back, no need to store it twice
    return state


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


def _float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items()}


def _check_loaded(model: SpeechHalf, speech: dict[str, torch.Tensor], directory: Path) -> None:
    expected = {f"projector.{k}" for k in model.projector.state_dict()}
    expected |= {f"lid_head.{k}" for k in model.lid_head.state_dict()}
    if model.ctc_head is not None:
        expected |= {f"ctc_head.{k}" for k in model.ctc_head.state_dict()}
    if model.config.encoder_kind == "zipper":
        expected |= {f"encoder.{k}" for k in model.encoder.state_dict()}
    missing = expected - speech.keys()
    if missing:
        raise ValueError(f"{directory}/speech.safetensors lacks {sorted(missing)[:5]}")
