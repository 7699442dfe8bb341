"""Memory and time of every architecture at its real published shape (issue 17), batch 1 and 8.

The models are ``tests/real_shapes.py``'s: the published config.json with the language model cut to
one layer and the vision tower to two, random weights, the real hidden sizes, vocabulary, image
processor and patch layout; one easy-vqa question per sample, its image resized to the real size
(square: the fewest anyres crops). Three operations, each in a fresh subprocess so that its peak
RSS (``resource.getrusage`` max RSS of that process) is its own:

- ``lora_step``: LoRA (r=8 on the language model) loss + backward + AdamW step on a training batch;
- ``saliency``: ``vision_token_scores(..., "saliency", K=1)`` (vision tokens, then one forward and
  one backward of the first generation step with respect to them);
- ``masked_generate``: ``masked_generate`` at ratio 0.45 (saliency, mean replacement), 2 new tokens.

Each process loads the model (``load_model``, fp32), runs the operation twice at batch 1 (warm-up),
then times it ``--repeats`` times at batch 1 or ``--repeats-large`` times at larger batches and
reports the median per sample; collation is outside the timing. A case that fails or runs past
``--timeout`` seconds (the whole process: load, warm-up and timed runs) is recorded as such.

    OMP_NUM_THREADS=2 python bench/real_shapes.py [--archs llava_1_5 ...] [--batches 1 8] [--out bench/real_shapes.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ("lora_step", "saliency", "masked_generate")
WARMUPS = 2  # runs at batch 1 before timing: here the first two ran up to 7x slower than the third


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def child_build(name: str, folder: str) -> dict:
    from tests.real_shapes import build_real_shape

    started = time.perf_counter()
    path = build_real_shape(name, folder)
    record = json.loads((path / "defend_real_shapes.json").read_text())
    record["build_s"] = round(time.perf_counter() - started, 1)
    return record


def child_case(name: str, folder: str, batch_size: int, op: str, repeats: int) -> dict:
    import torch

    from defend.config import load_config
    from defend.models import load_model
    from defend.models.lora import apply_lora
    from defend.purify.masking import masked_generate
    from defend.purify.saliency import vision_token_scores
    from tests.real_shapes import overrides, real_samples

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    imported = rss_gb()
    cfg = load_config(None, overrides(folder, max_new_tokens=2))
    vlm = load_model(cfg)
    vlm.model = apply_lora(vlm.model, cfg.lora, quantized=False)
    loaded = rss_gb()
    samples = real_samples(name, batch_size)
    collate = vlm.train_collator() if op == "lora_step" else vlm.generate_collator()
    warm, batch = collate(samples[:1]), collate(samples)
    generator = torch.Generator().manual_seed(0)
    if op == "lora_step":
        optimizer = torch.optim.AdamW([p for p in vlm.model.parameters() if p.requires_grad], lr=1e-4)

        def run(b):
            loss = vlm.loss(b)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif op == "saliency":
        def run(b):
            vision_token_scores(vlm, b, "saliency", 1, generator)
    else:
        def run(b):
            masked_generate(vlm, b, 0.45, "saliency", "mean", 1, generator)
    for _ in range(WARMUPS):
        run(warm)
    load = [os.getloadavg()[0]]
    seconds, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        run(batch)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    load.append(os.getloadavg()[0])
    image_tokens = int(vlm.image_positions(batch["input_ids"]).sum()) // batch_size
    return {"arch": name, "batch": batch_size, "op": op,
            "s_per_sample": round(statistics.median(seconds) / batch_size, 3),
            "s_batch_runs": [round(s, 2) for s in seconds],
            "cpu_s_per_sample": round(statistics.median(cpu) / batch_size, 3),
            "cpu_s_batch_runs": [round(s, 2) for s in cpu], "peak_rss_gb": round(peak_rss_gb(), 2),
            "rss_after_imports_gb": round(imported, 2), "rss_after_load_gb": round(loaded, 2),
            "sequence_length": int(batch["input_ids"].shape[1]), "vision_tokens_per_image": image_tokens,
            "threads": torch.get_num_threads(), "loadavg_1min_before_after": load}


def spawn(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run this file as a child with ``args``; its last stdout line is the JSON result."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        kind = "killed (out of memory?)" if done.returncode in (-9, 137) else f"failed (exit {done.returncode})"
        return None, f"{kind} after {time.perf_counter() - started:.0f} s: {' | '.join(tail)}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "1")), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def cell(result: dict | None, error: str, key: str, fmt: str) -> str:
    return format(result[key], fmt) if result else error.split(":")[0]


def table(results: dict) -> str:
    """The markdown table of ``results``; ``load avg``: the highest 1-minute load average seen around the
    row's timed runs (this process alone with 2 threads reads about 2; more means other work shared
    the cores and the wall times are inflated by it)."""
    lines = [("| arch | params (M), fp32 GB | vision tokens / image | batch | seq len |"
              " LoRA step s/sample (wall / CPU) | saliency s/sample (wall / CPU) | masked gen s/sample (wall / CPU) |"
              " peak RSS GB (LoRA / saliency / masked gen) | load avg |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arch in results["archs"].items():
        build = arch.get("build") or {}
        for batch, cases in arch["cases"].items():
            ok = [c["result"] for c in cases.values() if c["result"]]
            first = ok[0] if ok else None
            times = [cell(cases[op]["result"], cases[op]["error"], "s_per_sample", ".2f") + " / "
                     + cell(cases[op]["result"], cases[op]["error"], "cpu_s_per_sample", ".2f")
                     if cases[op]["result"] else cases[op]["error"].split(":")[0] for op in OPS]
            peaks = " / ".join(cell(cases[op]["result"], cases[op]["error"], "peak_rss_gb", ".1f") for op in OPS)
            params = build.get("parameters", 0)
            lines.append(f"| {name} | {params / 1e6:.0f}, {4 * params / 1e9:.1f} |"
                         f" {first['vision_tokens_per_image'] if first else '?'} | {batch} |"
                         f" {first['sequence_length'] if first else '?'} | {' | '.join(times)} | {peaks} |"
                         f" {max((x for c in ok for x in c['loadavg_1min_before_after']), default=0):.1f} |")
    return "\n".join(lines)


def main() -> None:
    from tests.real_shapes import ARCHS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at batch 1 (the median is reported)")
    parser.add_argument("--repeats-large", type=int, default=2, help="timed runs at larger batches")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--out", default=str(ROOT / "bench" / "real_shapes.json"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still removes its model folder
    results = {"machine": machine(), "ops": list(OPS), "archs": {}}
    for name in args.archs:
        folder = tempfile.mkdtemp(prefix=f"real_shape_{name}_")
        try:
            build, error = spawn(["--build", name, folder], args.timeout)
            arch = results["archs"][name] = {"build": build, "build_error": error, "cases": {}}
            print(f"{name}: built in {build['build_s']} s" if build else f"{name}: build {error}", flush=True)
            for batch in args.batches:
                for op in OPS:
                    repeats = args.repeats if batch == 1 else args.repeats_large
                    result, error = spawn(["--case", name, folder, str(batch), op, str(repeats)], args.timeout) \
                        if build else (None, "not built")
                    arch["cases"].setdefault(str(batch), {})[op] = {"result": result, "error": error}
                    print(f"  batch {batch} {op}: {json.dumps(result) if result else error}", flush=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":  # re-print the table of a results file
        print(table(json.loads(Path(sys.argv[2]).read_text())))
    elif len(sys.argv) > 1 and sys.argv[1] == "--build":
        print(json.dumps(child_build(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(child_case(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))))
    else:
        main()
