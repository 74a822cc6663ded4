"""Prometheus metrics of the service, one registry per app (so tests can start several apps).

Names follow Prometheus conventions: a `zasr_` namespace, base units in the name, `_total` counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def language_label(language: str | None) -> str:
    """The `language` label of a transcription's metrics: the language it was transcribed with, or "unknown" (LID's
    fallback, decoded without a language)."""
    return language or "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zasr_requests_total", "HTTP requests answered", ["endpoint", "status", "language"],
                                registry=r)
        self.request_seconds = Histogram("zasr_request_duration_seconds", "Request latency, end to end",
                                         ["endpoint", "language"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("zasr_queue_wait_seconds", "Time a row waited for a batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.audio_prepare_seconds = Histogram(
            "zasr_audio_prepare_duration_seconds", "Time an upload spent in the audio stage: waiting for an audio "
            "worker, then decoding, voice activity, features and the speech half where the audio workers run it "
            "(ZASR_ENCODER_IN_WORKERS)", buckets=LATENCY_BUCKETS, registry=r)
        self.audio_uploads_waiting = Gauge("zasr_audio_uploads_waiting", "Uploads waiting for an audio worker",
                                           registry=r)
        self.audio_worker_call_seconds = Histogram(
            "zasr_audio_worker_call_duration_seconds", "Duration of each audio worker call that completed, from "
            "its submission (several uploads under load; a call queued behind another waits for it)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.audio_worker_call_uploads = Histogram("zasr_audio_worker_call_uploads",
                                                   "Uploads in each audio worker call that completed",
                                                   buckets=BATCH_BUCKETS, registry=r)
        self.encode_seconds = Histogram("zasr_encode_duration_seconds", "The engine's share of the speech half per "
                                        "batch: prompts, and encoder, LID and projector for rows the audio workers "
                                        "did not hear",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Histogram("zasr_decode_duration_seconds",
                                        "LLM decoding time per row, from joining the decoding to its last token",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter("zasr_audio_seconds_total", "Seconds of audio transcribed", ["language"],
                                     registry=r)
        self.real_time_factor = Histogram("zasr_real_time_factor", "Processing seconds per audio second, per request",
                                          buckets=RTF_BUCKETS, registry=r)
        self.batch_size = Histogram("zasr_batch_size_rows", "Rows per engine batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_rows = Histogram("zasr_decode_step_rows", "Rows in each decoding step (embedded engine)",
                                   buckets=BATCH_BUCKETS, registry=r)
        self.batch_languages = Histogram("zasr_batch_languages", "Distinct languages per engine batch",
                                         buckets=(1, 2, 3, 4, 6, 8, 12), registry=r)
        self.queue_depth = Gauge("zasr_queue_depth_rows", "Rows waiting for the engine", registry=r)
        self.abandoned_rows = Counter("zasr_abandoned_rows_total", "Rows dropped because their request gave up "
                                      "(timed out, client gone, realtime decode no longer wanted), by where they were",
                                      ["stage"], registry=r)
        self.cache_hits = Counter("zasr_adapter_cache_hits_total", "Adapter cache hits", registry=r)
        self.cache_misses = Counter("zasr_adapter_cache_misses_total", "Adapter cache misses (merges)", registry=r)
        self.cache_evictions = Counter("zasr_adapter_cache_evictions_total", "Adapters evicted", registry=r)
        self.merge_seconds = Histogram("zasr_adapter_merge_duration_seconds", "Time to merge one language's adapter",
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r)
        self.cache_bytes = Gauge("zasr_adapter_cache_bytes", "Bytes of merged adapters held", registry=r)
        self.cache_entries = Gauge("zasr_adapter_cache_entries", "Merged adapters held", registry=r)
        self.lora_slot_loads = Counter("zasr_vllm_lora_slot_loads_total",
                                       "vLLM backend: submissions whose adapter was not among the max_loras most "
                                       "recently used (an adapter load into a vLLM slot)", ["adapter"], registry=r)
        self.decoding_loops = Counter(
            "zasr_decoding_loops_stopped_total",
            "Rows whose decoding fell into a repetition loop and was stopped, its repeats dropped "
            "(decode: final, or partial for a realtime turn's partial re-decode)", ["adapter", "decode"], registry=r)
        self.rejected = Counter("zasr_rejected_requests_total", "Requests refused before the engine", ["reason"],
                                registry=r)
        # --- realtime WebSocket sessions (server/realtime.py); the gauges read the live sessions at scrape time ---
        self.realtime_sessions = Gauge("zasr_realtime_sessions", "Open realtime WebSocket sessions", registry=r)
        self.realtime_buffered_seconds = Gauge("zasr_realtime_buffered_audio_seconds",
                                               "Audio held by realtime sessions (buffers and turns)", registry=r)
        self.realtime_tasks = Gauge("zasr_realtime_tasks", "Partial and final decodes in progress for realtime "
                                    "sessions", registry=r)
        self.realtime_turns = Counter("zasr_realtime_turns_total", "Realtime turns by outcome (completed, failed, "
                                      "cleared, abandoned: the client left first)", ["outcome"], registry=r)
        self.realtime_updates = Counter("zasr_realtime_partial_updates_total", "Partial re-decodes of open turns "
                                        "(decoded, or skipped: queue full)", ["result"], registry=r)
        self.realtime_encoder_frames = Counter("zasr_realtime_encoder_frames_total",
                                               "Encoder frames computed for partial updates", registry=r)
        self.realtime_revised = Counter("zasr_realtime_revised_turns_total",
                                        "Turns whose full decode did not extend the partial text already sent, so "
                                        "the transcript continues that text instead", registry=r)
        self.realtime_early_finals = Counter("zasr_realtime_early_finals_total",
                                             "Final decodes started during a turn's closing pause (used: the turn "
                                             "ended there; discarded: speech went on)", ["outcome"], registry=r)
        self.realtime_early_final_lead_seconds = Gauge(
            "zasr_realtime_early_final_lead_seconds", "How long before silence_duration_ms is out an early final "
            "starts (never before one speech pad into the pause; 0: not yet learnt, at the pad)", registry=r)
        self.realtime_completion_seconds = Histogram("zasr_realtime_completion_seconds",
                                                     "From a turn's commit to its completed event",
                                                     buckets=LATENCY_BUCKETS, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
