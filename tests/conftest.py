"""Shared fixtures: tiny random models built offline, so tests never need the trained weights."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from speechllm.encoder import EncoderConfig
from speechllm.llm import LLMDims, new_qwen2
from speechllm.model import SpeechLLM, SpeechLLMConfig
from speechllm.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "models" / "default"

SAMPLE_TEXTS = ["hello world", "guten tag", "привет мир", "こんにちは ありがとう", "สวัสดีครับ", "안녕하세요",
                "xin chào", "مرحبا بكم", "olá mundo", "bonjour", "hola amigo", "ciao bella"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads but synchronisation; on a busy machine (a
    training job on the other core) their spin-waits made engine tests over ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide, the engine's own thread included
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(SAMPLE_TEXTS * 10, vocab_size=400)


def tiny_speech_llm(tokenizer, adapter=None, chunked: bool = False) -> SpeechLLM:
    torch.manual_seed(0)
    llm = new_qwen2(tokenizer, LLMDims(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128))
    config = SpeechLLMConfig(encoder=EncoderConfig(d_model=64, n_layers=2, n_heads=4, dropout=0.0, chunked=chunked,
                                                   chunk_size=4), adapter=adapter)
    return SpeechLLM(config, llm, tokenizer).eval()


def cer_bound(language: str, margin: float = 0.2) -> float:
    """The shipped model's test-split CER for `language` (models/default/eval/test.json) plus `margin`:
    end-to-end tests hold the model to what its committed report says."""
    report = json.loads((SHIPPED_MODEL / "eval" / "test.json").read_text())
    return min(report["languages"][language]["cer"] + margin, 1.0)


def pcm16_wav(pcm: bytes, rate: int) -> bytes:
    """16-bit mono PCM as a WAV file written by FFmpeg (what a client would upload to the REST endpoint)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2")[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(settings: dict[str, str], log_path: Path, ready_within_s: float = 60) -> Iterator[str]:
    """`zipper-asr serve` as a real uvicorn subprocess with these ZASR_* settings (plus a free port);
    yields its URL once /ready answers 200 and stops it afterwards. Its log goes to a file (vLLM
    logs more than a pipe holds); the log is shown when the server dies or never gets ready."""
    import httpx

    port = free_port()
    env = os.environ | {"ZASR_MODEL_DIR": str(SHIPPED_MODEL)} | settings | {"ZASR_PORT": str(port)}
    with open(log_path, "w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "speechllm.cli", "serve"], env=env, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_within_s
            while True:
                try:
                    if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server {'exited' if process.poll() is not None else 'never got ready'}: "
                                f"{log.read()[-2000:]}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
