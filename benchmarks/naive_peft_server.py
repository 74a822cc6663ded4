"""The baseline for benchmarks/serving.py: a multi-adapter ASR server built the way most people would
first build it. Same model on the same device (ZASR_DEVICE), same frontend and encoder (its GEMMs in
ZASR_ENCODER_GEMM_DTYPE, as ours); the LLM is a `peft.PeftModel` holding one LoRA adapter per language, and each
request, one at a time, switches to its language's adapter with `set_adapter` and runs `generate` alone. No
batching, no grouping by language. It stops a repetition loop as our decoder does (speechllm.decoding.RowTokens), so
that both write the same text. It runs torch in one dedicated thread under the same thread policy as our server
(server/threads.py), so that the comparison measures batching and adapter handling, not OpenMP contention.

    python -m benchmarks.naive_peft_server --model models/default --adapters DIR --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Form, UploadFile
from peft import PeftModel
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from server.settings import Settings, resolve_device
from server.threads import engine_executor, use_one_thread
from speechllm.audio import load_audio
from speechllm.cpu_linear import GEMM_DTYPE_CHOICES, resolve_gemm_dtype
from speechllm.decoding import RowTokens
from speechllm.features import log_mel_spectrogram
from speechllm.inference import token_limits
from speechllm.model import SpeechLLM
from speechllm.prompt import eos_id
from speechllm.tokenizer import transcript_text


class StopLoop(StoppingCriteria):
    """Feeds each new text token to a RowTokens; stops `generate` (batch of one) when it finds a loop."""

    def __init__(self, eos: int) -> None:
        self.eos = eos
        self.row = RowTokens()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        token = int(input_ids[0, -1])
        looped = token != self.eos and self.row.add(token)
        return torch.tensor([looped], device=input_ids.device)


def build_app(model_dir: Path, adapters_dir: Path, encoder_gemm_dtype: str = "float32", device: str = "cpu"
              ) -> FastAPI:
    model_thread = engine_executor()
    use_one_thread()
    speech = SpeechLLM.load(model_dir, device=device, encoder_gemm_dtype=resolve_gemm_dtype(encoder_gemm_dtype))
    base = AutoModelForCausalLM.from_pretrained(model_dir / "llm", dtype=torch.float32).to(device)
    languages = sorted(p.name for p in adapters_dir.iterdir() if p.is_dir())
    llm = PeftModel.from_pretrained(base, adapters_dir / languages[0], adapter_name=languages[0])
    for language in languages[1:]:
        llm.load_adapter(adapters_dir / language, adapter_name=language)
    llm.eval()
    lock = asyncio.Lock()
    app = FastAPI()

    def transcribe(audio: bytes, language: str) -> str:
        features = log_mel_spectrogram(load_audio(audio)).to(device)
        with torch.no_grad():
            states, lengths = speech.encode(features[None], torch.tensor([features.shape[1]], device=device),
                                            chunk_size=0)
            embeds, embed_lengths = speech.audio_embeddings(states, lengths)
            prompt = speech.prompt_embeddings(embeds, embed_lengths, [language])[0]
            llm.set_adapter(language)
            mask = torch.ones(1, prompt.shape[0], dtype=torch.long, device=device)
            eos = eos_id(speech.tokenizer)
            stop = StopLoop(eos)
            llm.generate(inputs_embeds=prompt[None], attention_mask=mask, do_sample=False,
                         max_new_tokens=token_limits(embed_lengths)[0], eos_token_id=eos, pad_token_id=eos,
                         stopping_criteria=StoppingCriteriaList([stop]))
        return transcript_text(speech.tokenizer, stop.row.tokens)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(file: UploadFile, language: str = Form(...), model: str = Form("whisper-1")) -> dict:
        audio = await file.read()
        async with lock:  # one request at a time: the adapter switch is global state
            text = await asyncio.get_running_loop().run_in_executor(model_thread, transcribe, audio, language)
        return {"text": text}

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, required=True, help="one PEFT adapter directory per language")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--encoder-gemm-dtype", default=Settings().encoder_gemm_dtype,
                        choices=GEMM_DTYPE_CHOICES, help="default: ZASR_ENCODER_GEMM_DTYPE, as ours")
    parser.add_argument("--device", default=resolve_device(Settings().device), help="default: ZASR_DEVICE, as ours")
    args = parser.parse_args()
    uvicorn.run(build_app(args.model, args.adapters, args.encoder_gemm_dtype, args.device), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
