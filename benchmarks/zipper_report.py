"""The Zipper-LoRA reproduction report: the paper's claim tested on our corpus.

Reads the runs that `scripts/zipper_experiments.sh` trains and evaluates, and writes
benchmarks/results/zipper.{md,json} plus two plots:

- per-language and per-tier CER/WER on the test split for stage-1 shared, and stage 2 with the
  same step budget for shared, independent, Static, Hard and Soft; trainable parameter counts and
  wall times;
- the Initial-B ablation (warm vs zero B) as dev CER against steps (zipper_initial_b.png);
- chunked vs full-attention encoder for the best variant;
- the learned gates per language and rank (zipper_gates.png);
- the spread across seeds of the baselines and the shipped variant, where `scripts/zipper_seeds.sh`
  trained them again with other seeds;
- the baselines and Soft with a data-weighted sharing prior after a 1000-step stage 2, where
  `scripts/zipper_long.sh` trained them.

The best variant is chosen on the dev split (each run's best dev CER), never on test.

    .venv/bin/python -m benchmarks.zipper_report [--runs runs] [--out benchmarks/results]
    .venv/bin/python -m benchmarks.zipper_report --best      # print the best variant's run name
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from adapters.zipper import zipper_layers  # noqa: E402
from speechllm.languages import LANGUAGES  # noqa: E402

VARIANTS = ("shared", "independent", "static", "hard", "soft")
TIERS = ("high", "mid", "low")
ZIPPER_VARIANTS = ("static", "hard", "soft")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def stage2_dir(runs: Path, variant: str, init_b: str = "warm") -> Path:
    return runs / "stage2" / f"{variant}-{init_b}"


def best_variant(runs: Path) -> str:
    """The Zipper variant with the lowest best dev CER (the dev split is for model selection)."""
    scored = {v: read_json(stage2_dir(runs, v) / "summary.json") for v in ZIPPER_VARIANTS}
    scored = {v: s["best_dev_cer"] for v, s in scored.items() if s}
    if not scored:
        raise SystemExit(f"no trained Zipper variant under {runs}/stage2")
    return min(scored, key=scored.get)


def method_row(name: str, run: Path) -> dict | None:
    """A method's test report, dev summary, parameter count and wall time; None until it has all."""
    test = read_json(run / "eval-test.json")
    summary = read_json(run / "summary.json")
    if test is None or summary is None:
        return None
    wall = read_json(run / "wall_time.json") or {}
    return {"method": name, "run": str(run), "test": test, "best_dev_cer": summary["best_dev_cer"],
            "best_step": summary["best_step"], "trainable_parameters": summary["trainable_parameters"],
            "wall_seconds": wall.get("wall_seconds")}


def method_rows(runs: Path) -> list[dict]:
    """One row per method of the main comparison (scripts/zipper_experiments.sh)."""
    methods = [("stage-1 shared", runs / "stage1")] + [(v, stage2_dir(runs, v)) for v in VARIANTS]
    return [row for name, run in methods if (row := method_row(name, run))]


LONG_METHODS = ("shared", "independent", "soft-prior")


def long_stage2(runs: Path) -> dict | None:
    """The baselines and Soft with the data-weighted sharing prior after a 1000-step stage 2
    (scripts/zipper_long.sh), once all three have a test report."""
    rows = [method_row(name, runs / "stage2-1000" / name) for name in LONG_METHODS]
    if not all(rows):
        return None
    model = runs / "stage2-1000" / "soft-prior" / "model"
    seeds = spread_over_seeds({m: [runs / "stage2-1000" / m, *sorted((runs / "stage2-1000").glob(f"{m}-seed*"))]
                               for m in LONG_METHODS})
    return {"methods": rows, "claims": claims(rows, "soft-prior"), "gates": learned_gates(model),
            "seeds": seeds, "seed_claims": seed_claims(seeds, "soft-prior") if seeds else []}


def spread_over_seeds(runs_by_method: dict[str, list[Path]]) -> dict | None:
    """Test CER per tier and seed for every method with test reports from more than one seed (a run named
    `...-seed<N>` is seed N, any other seed 0); seed i of each method saw the same batches, so methods are
    also compared seed by seed."""
    spread = {}
    for method, found in runs_by_method.items():
        tests = {run.name.rpartition("-seed")[2] if "-seed" in run.name else "0": read_json(run / "eval-test.json")
                 for run in found if (run / "eval-test.json").exists()}
        if len(tests) > 1:
            spread[method] = {seed: {**{tier: t["tiers"][tier]["cer"] for tier in TIERS},
                                     "all": t["average"]["cer"]} for seed, t in tests.items()}
    return spread or None


def seed_spread(runs: Path) -> dict | None:
    """The 250-step comparison's methods over seed 0 and the seeds of scripts/zipper_seeds.sh."""
    return spread_over_seeds({v: [stage2_dir(runs, v), *sorted((runs / "stage2").glob(f"{v}-warm-seed*"))]
                              for v in VARIANTS})


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def seed_claims(spread: dict, best: str) -> list[str]:
    """The claim over the seeds that `best` shares with the baselines trained with more than one seed."""
    baselines = [m for m in ("shared", "independent") if m in spread]
    if best not in spread or not baselines:
        return []
    common = sorted(set(spread[best]).intersection(*(spread[m] for m in baselines)))
    low = {m: [spread[m][seed]["low"] for seed in common] for m in (best, *baselines)}
    high = {m: [spread[m][seed]["high"] for seed in common] for m in (best, *baselines)}
    wins = sum(low[best][i] < min(low[m][i] for m in baselines) for i in range(len(common)))
    means = {m: mean_sd(v)[0] for m, v in low.items()}
    high_means = {m: mean_sd(v)[0] for m, v in high.items()}
    low_ok = means[best] < min(means[m] for m in baselines)
    better_high = min(high_means[m] for m in baselines)
    high_ok = high_means[best] <= better_high + 0.005
    against = " and ".join(f"{m} {pct(means[m])} %" for m in baselines)
    missing = [m for m in ("shared", "independent") if m not in baselines]
    return [f"over seeds {', '.join(common)}: low tier mean {best} {pct(means[best])} % vs {against} → "
            f"{'holds' if low_ok else 'does not hold'}; {best} is below {'both' if len(baselines) > 1 else 'it'} "
            f"in {wins} of {len(common)} seeds" + (f" ({', '.join(missing)}: one seed only)" if missing else ""),
            f"over the same seeds: high tier mean {best} {pct(high_means[best])} % vs the better baseline "
            f"{pct(better_high)} % → {'holds' if high_ok else 'does not hold'}",
            *pairwise_seed_lines(spread, best, baselines, common)]


def pairwise_seed_lines(spread: dict, best: str, baselines: list[str], common: list[str]) -> list[str]:
    """`best` against each baseline that shares more seeds with it than all three methods share."""
    lines = []
    for baseline in baselines:
        seeds = sorted(set(spread[best]) & set(spread[baseline]))
        if len(seeds) <= len(common):
            continue
        ours, theirs = ([spread[m][seed]["low"] for seed in seeds] for m in (best, baseline))
        below = sum(a < b for a, b in zip(ours, theirs, strict=True))
        lines.append(f"against {baseline} alone, over seeds {', '.join(seeds)}: low tier mean {best} "
                     f"{pct(mean_sd(ours)[0])} % vs {pct(mean_sd(theirs)[0])} %; {best} is below in {below} of "
                     f"{len(seeds)} seeds")
    return lines


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    return next((r["step"] for r in curve if "dev_cer" in r and r["dev_cer"] <= target + 1e-9), None)


def initial_b_ablation(runs: Path, variant: str) -> dict | None:
    """Warm vs zero B for `variant`: dev curves and steps to the best dev CER both runs reach."""
    curves = {init: read_curve(stage2_dir(runs, variant, init) / "curve.jsonl") for init in ("warm", "zero")}
    dev = {init: [r for r in curve if "dev_cer" in r] for init, curve in curves.items()}
    if not all(dev.values()):
        return None
    target = max(min(r["dev_cer"] for r in rows) for rows in dev.values())
    return {"variant": variant, "dev_target_cer": target,
            "steps_to_target": {init: steps_to_reach(rows, target) for init, rows in dev.items()},
            "dev_curves": {init: [(r["step"], r["dev_cer"]) for r in rows] for init, rows in dev.items()}}


def chunked_comparison(runs: Path, variant: str) -> dict | None:
    run = stage2_dir(runs, variant)
    full, chunked = read_json(run / "eval-test.json"), read_json(run / "eval-test-chunked.json")
    if full is None or chunked is None:
        return None
    return {"variant": variant, "chunk_size": chunked.get("chunk_size"),
            "full": {"tiers": full["tiers"], "average": full["average"]},
            "chunked": {"tiers": chunked["tiers"], "average": chunked["average"]}}


@torch.no_grad()
def learned_gates(model_dir: Path) -> dict:
    """Per-language share of B_s for each rank, averaged over the adapted modules, and per module type."""
    from speechllm.model import SpeechLLM

    model = SpeechLLM.load(model_dir)
    per_module: dict[str, list[torch.Tensor]] = {}
    for name, layer in zipper_layers(model.llm):
        per_module.setdefault(name.rsplit(".", 1)[-1], []).append(layer.gates().float())
    everything = torch.stack([g for gates in per_module.values() for g in gates])
    return {"languages": list(model.config.languages),
            "mean_over_modules": everything.mean(0).tolist(),
            "shared_fraction_by_module_type": {k: torch.stack(v).mean((0, 2)).tolist() for k, v in per_module.items()}}


def language_divergence(model_dir: Path) -> dict | None:
    """How far stage 2 moved each language's own B_l from the shared B_s: ‖B_l − B_s‖ / ‖B_s‖ over
    all adapted modules (0 right after Initial-B). Small values mean the languages have not yet
    specialised, whatever the gates say."""
    from safetensors.torch import load_file

    tensors = load_file(model_dir / "adapter.safetensors")
    shared = {k.removesuffix(".lora_B_shared"): v.float() for k, v in tensors.items() if k.endswith("lora_B_shared")}
    own = {k.removesuffix(".lora_B_language"): v.float() for k, v in tensors.items()
           if k.endswith("lora_B_language")}
    if not shared or not own:
        return None
    languages = json.loads((model_dir / "config.json").read_text())["languages"]
    distance = torch.zeros(len(languages))
    norm = 0.0
    for name, b_shared in shared.items():
        distance += ((own[name] - b_shared[None]) ** 2).sum((1, 2))
        norm += float((b_shared**2).sum())
    return {code: round(float((d / norm) ** 0.5), 4) for code, d in zip(languages, distance, strict=True)}


def plot_ablation(ablation: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for init, label in (("warm", "Initial-B (B_s, B_l ← stage-1 B)"), ("zero", "zero-initialised B")):
        steps, cer = zip(*ablation["dev_curves"][init], strict=True)
        ax.plot(steps, [100 * c for c in cer], marker="o", label=label)
    ax.axhline(100 * ablation["dev_target_cer"], color="grey", linestyle=":", label="dev target")
    ax.set(xlabel="stage-2 step", ylabel="dev CER %", title=f"Initial-B ablation ({ablation['variant']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gates(gates: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(gates), figsize=(5 * len(gates), 4.5), squeeze=False)
    for ax, (variant, g) in zip(axes[0], gates.items(), strict=True):
        image = ax.imshow(g["mean_over_modules"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(g["languages"])), g["languages"])
        ax.set(xlabel="rank", title=f"{variant}: gate g_l (1 = shared B_s)")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def seed_table(spread: dict) -> list[str]:
    lines = ["| method | seeds | high | mid | low | all |", "|---|---:|---:|---:|---:|---:|"]
    for method, by_seed in spread.items():
        cells = []
        for tier in (*TIERS, "all"):
            mean, sd = mean_sd([r[tier] for r in by_seed.values()])
            cells.append(f"{pct(mean)} ± {pct(sd)}")
        lines.append(f"| {method} | {', '.join(by_seed)} | " + " | ".join(cells) + " |")
    return lines


def method_table(rows: list[dict]) -> list[str]:
    """Test CER % per tier, and the test rows whose decoding stopped in a repetition loop (docs/model.md)."""
    lines = ["| method | high | mid | low | all | loops stopped | trainable params | best dev CER % (step) | "
             "wall time |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tiers = r["test"]["tiers"]
        wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.1f} min"
        lines.append(f"| {r['method']} | {pct(tiers['high']['cer'])} | {pct(tiers['mid']['cer'])} | "
                     f"{pct(tiers['low']['cer'])} | {pct(r['test']['average']['cer'])} | "
                     f"{r['test'].get('loops_stopped', '–')} | "
                     f"{r['trainable_parameters']:,} | {pct(r['best_dev_cer'])} ({r['best_step']}) | {wall} |")
    return lines


def gate_shares(gates: dict) -> list[str]:
    """Each language's mean gate (share of B_s) over ranks and modules, in the languages' order."""
    return [f"{sum(row) / len(row):.2f}" for row in gates["mean_over_modules"]]


def markdown(report: dict) -> str:
    rows = report["methods"]
    codes = [lang.code for lang in LANGUAGES]
    lines = ["# Zipper-LoRA reproduction on the 12-language espeak-ng corpus", "",
             f"Test split, CER %. Best Zipper variant on dev: **{report['best_variant']}**. "
             "Regenerate: `bash scripts/zipper_experiments.sh`. Decoding stops a repetition loop and keeps one "
             "copy (docs/model.md, *Decoding*): *loops stopped* counts the test rows where it did.", ""]
    lines += method_table(rows)
    lines += ["", "Per language, CER % (WER % in brackets):", "",
              "| method | " + " | ".join(codes) + " |", "|---|" + "---:|" * len(codes)]
    for r in rows:
        cells = [f"{pct(r['test']['languages'][c]['cer'])} ({pct(r['test']['languages'][c]['wer'])})" for c in codes]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "## The claim", ""] + [f"- {line}" for line in report["claims"]]
    if report.get("seeds"):
        lines += ["", "## Across seeds", "",
                  "Stage 2 trained again with other seeds (initialisation, batch order, dev subset for model "
                  "selection), everything else as above: test CER %, mean ± standard deviation over seeds. "
                  "Regenerate: `bash scripts/zipper_seeds.sh`.", ""] + seed_table(report["seeds"])
        lines += [""] + [f"- {line}" for line in report["seed_claims"]]
    if report.get("initial_b"):
        a = report["initial_b"]
        lines += ["", f"## Initial-B ablation ({a['variant']})", "",
                  f"Dev target: {pct(a['dev_target_cer'])} % CER (the best dev CER both runs reach). "
                  f"Steps to reach it: warm {a['steps_to_target']['warm']}, zero {a['steps_to_target']['zero']}.",
                  "", "![Initial-B ablation](zipper_initial_b.png)"]
    if report.get("chunked"):
        c = report["chunked"]
        lines += ["", f"## Chunked vs full-attention encoder ({c['variant']}, chunk {c['chunk_size']} frames)", "",
                  "| encoder | high | mid | low | all |", "|---|---:|---:|---:|---:|"]
        for mode in ("full", "chunked"):
            t = c[mode]["tiers"]
            lines.append(f"| {mode} | {pct(t['high']['cer'])} | {pct(t['mid']['cer'])} | {pct(t['low']['cer'])} | "
                         f"{pct(c[mode]['average']['cer'])} |")
    if report.get("gates"):
        lines += ["", "## Learned gates", "", "Share of the shared subspace B_s per language (mean gate over ranks "
                  "and modules):", "", "| variant | " + " | ".join(codes) + " |", "|---|" + "---:|" * len(codes)]
        for variant, g in report["gates"].items():
            lines.append(f"| {variant} | " + " | ".join(gate_shares(g)) + " |")
        lines += ["", "![gates](zipper_gates.png)"]
    if report.get("divergence"):
        lines += ["", "## How far the languages moved apart", "",
                  "‖B_l − B_s‖ / ‖B_s‖ over all adapted modules after stage 2 (0 right after Initial-B):", "",
                  "| variant | " + " | ".join(codes) + " |", "|---|" + "---:|" * len(codes)]
        for variant, d in report["divergence"].items():
            if d:
                lines.append(f"| {variant} | " + " | ".join(f"{d[c]:.3f}" for c in codes) + " |")
    if report.get("long"):
        long = report["long"]
        lines += ["", "## After a 1000-step stage 2", "",
                  "In the 250 steps above the routers hardly leave their start. The dev-only probes "
                  "(`scripts/zipper_probes.sh`, docs/model.md) chose on the dev split Soft with its routers at 100× "
                  "the learning rate and a prior towards sharing weighted by each language's data (λ 0.1, "
                  "w_l = (n_min / n_l)^0.5). The two baselines and that configuration (`soft-prior`), 1000 steps each, "
                  "selected on the whole dev split (100 utterances per language), seed 0, test split evaluated once. "
                  "Regenerate: `bash scripts/zipper_long.sh`.", ""] + method_table(long["methods"])
        lines += ["", "Share of B_s in `soft-prior`'s gates per language:", "",
                  "| " + " | ".join(codes) + " |", "|" + "---:|" * len(codes),
                  "| " + " | ".join(gate_shares(long["gates"])) + " |", ""]
        lines += [f"- {line}" for line in long["claims"]]
        if long.get("seeds"):
            lines += ["", "The same, trained again with other seeds (e.g. `SEEDS=\"1 2\" METHODS=\"shared soft-prior\" "
                      "bash scripts/zipper_long.sh`): test CER %, mean ± standard deviation over seeds.", ""]
            lines += seed_table(long["seeds"]) + [""] + [f"- {line}" for line in long["seed_claims"]]
    return "\n".join(lines) + "\n"


def claims(rows: list[dict], best: str) -> list[str]:
    """The paper's acceptance claims, checked on the measured test numbers."""
    by_method = {r["method"]: r["test"]["tiers"] for r in rows}
    if not {best, "shared", "independent"} <= by_method.keys():
        return ["not all of the best variant, shared and independent were evaluated"]
    z, s, i = by_method[best], by_method["shared"], by_method["independent"]
    low_ok = z["low"]["cer"] < min(s["low"]["cer"], i["low"]["cer"])
    better_high = min(s["high"]["cer"], i["high"]["cer"])
    high_ok = z["high"]["cer"] <= better_high + 0.005
    return [f"low tier: {best} {pct(z['low']['cer'])} % vs shared {pct(s['low']['cer'])} % and independent "
            f"{pct(i['low']['cer'])} % → {'holds' if low_ok else 'does not hold'}",
            f"high tier: {best} {pct(z['high']['cer'])} % vs the better baseline {pct(better_high)} % (allowed +0.5) "
            f"→ {'holds' if high_ok else 'does not hold'}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--best", action="store_true", help="print the best variant (on dev) and exit")
    args = parser.parse_args()
    best = best_variant(args.runs)
    if args.best:
        print(best)
        return
    rows = method_rows(args.runs)
    seeds = seed_spread(args.runs)
    report = {"best_variant": best, "methods": rows, "claims": claims(rows, best),
              "seeds": seeds, "seed_claims": seed_claims(seeds, best) if seeds else [],
              "initial_b": initial_b_ablation(args.runs, best), "chunked": chunked_comparison(args.runs, best),
              "gates": {v: learned_gates(stage2_dir(args.runs, v) / "model") for v in ("hard", "soft")
                        if (stage2_dir(args.runs, v) / "model").exists()},
              "divergence": {v: language_divergence(stage2_dir(args.runs, v) / "model") for v in ZIPPER_VARIANTS
                             if (stage2_dir(args.runs, v) / "model").exists()},
              "long": long_stage2(args.runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    if report["initial_b"]:
        plot_ablation(report["initial_b"], args.out / "zipper_initial_b.png")
    if report["gates"]:
        plot_gates(report["gates"], args.out / "zipper_gates.png")
    for r in rows + (report["long"]["methods"] if report["long"] else []):  # details stay in the runs
        r["test"] = {k: r["test"][k] for k in ("languages", "tiers", "average", "lid_accuracy_long", "loops_stopped")}
    (args.out / "zipper.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "zipper.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
