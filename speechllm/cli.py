"""`zipper-asr`: one command-line entry for the corpus, the training recipe, evaluation and inference."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_CORPUS = Path("data/corpus")
DEFAULT_RUNS = Path("runs")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def _timed(name: str, out_dir: Path, work) -> None:
    start = time.monotonic()
    work()
    wall = time.monotonic() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "wall_time.json").write_text(json.dumps({"step": name, "wall_seconds": round(wall, 1)}) + "\n")
    print(f"{name}: {wall / 60:.1f} min")


def cmd_corpus(args: argparse.Namespace) -> None:
    from adapters.corpus import CorpusConfig, build_corpus

    config = CorpusConfig.tiny(args.out) if args.tiny else CorpusConfig(out_dir=args.out, seed=args.seed)
    build_corpus(config)


def cmd_pretrain_llm(args: argparse.Namespace) -> None:
    from speechllm.pretrain import pretrain_llm

    _timed("pretrain-llm", args.out, lambda: pretrain_llm(args.corpus, args.out, steps=args.steps))


def cmd_pretrain_encoder(args: argparse.Namespace) -> None:
    from speechllm.pretrain import pretrain_encoder

    _timed("pretrain-encoder", args.out, lambda: pretrain_encoder(args.corpus, args.out, steps=args.steps))


def cmd_train_stage1(args: argparse.Namespace) -> None:
    from adapters.train import Stage1Settings, train_stage1

    settings = Stage1Settings(steps=args.steps, train_encoder=args.train_encoder, eval_every=args.eval_every,
                              lr=args.lr)
    _timed("train-stage1", args.out,
           lambda: print(train_stage1(args.corpus, args.llm, args.encoder, args.out, settings, args.resume_from)))


def cmd_train_adapters(args: argparse.Namespace) -> None:
    from adapters.train import Stage2Settings, train_adapters
    from adapters.zipper import Variant

    settings = Stage2Settings(steps=args.steps, eval_every=args.eval_every, variant=Variant(args.variant),
                              init_b=args.init_b, sampling_temperature=args.sampling_temperature, lr=args.lr,
                              seed=args.seed, dev_per_language=args.dev_per_language,
                              router_lr_scale=args.router_lr_scale, router_sharing_weight=args.router_sharing_weight,
                              router_sharing_data_power=args.router_sharing_data_power)
    out = args.out or DEFAULT_RUNS / f"stage2-{args.variant}-{args.init_b}"
    _timed("train-adapters", out, lambda: print(train_adapters(args.corpus, args.stage1, out, settings)))


def cmd_export_adapters(args: argparse.Namespace) -> None:
    from adapters.export import export_model_adapters

    for directory in export_model_adapters(args.model, args.out):
        print(directory)


def cmd_eval(args: argparse.Namespace) -> None:
    from adapters.evaluate import evaluate_model_dir, markdown_table

    report = evaluate_model_dir(args.model, args.corpus, args.split, args.out, chunk_size=args.chunk_size,
                                encoder_gemm_dtype=args.encoder_gemm_dtype)
    print(markdown_table(report, f"{args.model.name}: {args.split}"))


def cmd_transcribe(args: argparse.Namespace) -> None:
    import asyncio

    from server.offline import transcribe_files
    from server.settings import Settings

    settings = Settings(model_dir=args.model) if args.model else Settings()
    failed = 0
    for path, rendered, error in asyncio.run(transcribe_files(settings, args.files, args.language, args.format)):
        if error is not None:
            failed += 1
            print(f"zipper-asr transcribe: {path}: {error}", file=sys.stderr)
            continue
        if len(args.files) > 1:
            print(f"==> {path}")
        print(rendered.rstrip("\n"))
    if failed:
        sys.exit(1)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model_dir": args.model}.items() if v}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=settings.shutdown_timeout_s, ws_max_size=settings.websocket_max_message_bytes)


def cmd_stream(args: argparse.Namespace) -> None:
    import asyncio

    from server.stream_client import stream_file

    asyncio.run(stream_file(args.file, args.url, args.language, args.api_key, args.speed, show_events=args.events))


def build_parser() -> argparse.ArgumentParser:
    from speechllm.cpu_linear import GEMM_DTYPE_CHOICES  # (torch: main has imported it already)

    parser = argparse.ArgumentParser(prog="zipper-asr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="synthesize the 12-language corpus with espeak-ng")
    p.add_argument("--out", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few utterances per language (tests, smoke runs)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("pretrain-llm", help="train the tokenizer and the tiny LLM (text LM + reading task)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=DEFAULT_RUNS / "llm")
    p.add_argument("--steps", type=int, default=4000)
    p.set_defaults(func=cmd_pretrain_llm)

    p = sub.add_parser("pretrain-encoder", help="CTC-pretrain the encoder on high- and mid-tier speech")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=DEFAULT_RUNS / "encoder")
    p.add_argument("--steps", type=int, default=2000)
    p.set_defaults(func=cmd_pretrain_encoder)

    p = sub.add_parser("train-stage1", help="projector + fully shared LoRA + LID head on the 12-language mix")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--llm", type=Path, default=DEFAULT_RUNS / "llm")
    p.add_argument("--encoder", type=Path, default=DEFAULT_RUNS / "encoder")
    p.add_argument("--out", type=Path, default=DEFAULT_RUNS / "stage1")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--train-encoder", action="store_true", help="fine-tune the encoder too (default: frozen)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resume-from", type=Path, default=None, help="continue from a saved stage-1 model directory")
    p.set_defaults(func=cmd_train_stage1)

    p = sub.add_parser("train-adapters", help="Zipper-LoRA stage 2 (or a baseline) from the stage-1 model")
    p.add_argument("--variant", required=True, choices=["static", "hard", "soft", "shared", "independent"])
    p.add_argument("--init-b", default="warm", choices=["warm", "zero"], help="Initial-B warm start, or zero B")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--stage1", type=Path, default=DEFAULT_RUNS / "stage1" / "model")
    p.add_argument("--out", type=Path, default=None, help="default runs/stage2-VARIANT-INIT")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--sampling-temperature", type=float, default=1.0, help="language sampling: p ∝ n_l^τ")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch order and the dev subset")
    p.add_argument("--dev-per-language", type=int, default=20, help="dev utterances per language for model selection")
    p.add_argument("--router-lr-scale", type=float, default=1.0, help="learning rate of routers and language "
                   "embedding, relative to --lr")
    p.add_argument("--router-sharing-weight", type=float, default=0.0, help="weight of a loss term pulling the "
                   "Hard/Soft gates towards sharing: mean(1 - g) over layers, languages and ranks")
    p.add_argument("--router-sharing-data-power", type=float, default=0.0, help="each language's share of that "
                   "prior: (n_min / n_l) ** power over its training clips (0: the same for all)")
    p.set_defaults(func=cmd_train_adapters)

    p = sub.add_parser("export-adapters", help="write each language's B(l) as a PEFT LoRA (for vLLM and peft)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=None, help="default MODEL/adapters")
    p.set_defaults(func=cmd_export_adapters)

    p = sub.add_parser("eval", help="per-language WER/CER, tier averages and LID accuracy on a split")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--chunk-size", type=int, default=None, help="0: full attention; N: chunked encoder")
    p.add_argument("--encoder-gemm-dtype", default="float32", choices=GEMM_DTYPE_CHOICES,
                   help="the speech encoder's matrix products, as the server's ZASR_ENCODER_GEMM_DTYPE (whose "
                        "default is auto: bfloat16 on CPUs with bf16 instructions); float32 here, the model as trained")
    p.add_argument("--out", type=Path, default=Path("runs/eval/test"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="run the HTTP service (settings: ZASR_* environment variables)")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (ZASR_HOST)")
    p.add_argument("--port", type=int, default=None, help="default 8000 (ZASR_PORT)")
    p.add_argument("--model", type=Path, default=None, help="model directory (ZASR_MODEL_DIR)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("transcribe", help="transcribe audio files offline, through the service's engine")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument("--language", default=None, help="ISO-639-1 code; default: detect")
    p.add_argument("--format", default="text", choices=["json", "text", "srt", "vtt", "verbose_json"],
                   help="as the API's response_format (server.protocol.ResponseFormat)")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("stream", help="play an audio file in real time to a server's /v1/realtime; print the "
                                      "transcript as it arrives")
    p.add_argument("file", type=Path)
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/realtime")
    p.add_argument("--language", default=None, help="ISO-639-1 code; default: detect")
    p.add_argument("--api-key", default=None, help="Bearer key, when the server has ZASR_API_KEYS")
    p.add_argument("--speed", type=float, default=1.0, help="play faster (2: twice real time) or slower")
    p.add_argument("--events", action="store_true", help="print every server event as JSON instead")
    p.set_defaults(func=cmd_stream)
    return parser


def main(argv: list[str] | None = None) -> None:
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
