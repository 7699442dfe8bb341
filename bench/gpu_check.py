"""GPU check (issue 17): LoRA step, generation and DiSP purification at the real LLaVA-1.5-7B shape.

On the device machine (one GPU, < 8 min; writes partial JSON after every stage):

    python bench/gpu_check.py --out $OUT/gpu_check.json

Here (CPU, a shrunk copy of the same config, the same code path, < 1 min):

    python bench/gpu_check.py --smoke --out /tmp/gpu_check.json

``--model llada_v``: the same stages on LLaDA-V's published shape (issue 18; ``tests/real_shapes.py``
``llada_v_real_shape``: LLaDA-8B's 32 layers of 4096, vocab 126464, SigLIP so400m-384 as LLaDA-V keeps
it, anyres_max_4; one 384 px image = the base view + 1 crop = 1485 vision tokens), as the masked-
diffusion family runs it: the sampler (``--new-tokens`` steps, one token a step, blocks of 32,
``--cache``), DiSP's masked generation, and the LLaDA SFT loss under LoRA (LLaDA-V's label rule).

Random weights at the published shape: ``tests/fixtures/real_configs/llava_1_5/config.json`` (CLIP
ViT-L/14-336 tower, 2-layer MLP projector) with the text model as Vicuna-7B (hidden 4096, 32 layers,
32 heads, intermediate 11008, vocab 32064, 4096 positions), bf16, sdpa attention, built directly on
the device (nothing is written to disk). The processor is the offline tiny BPE tokenizer (its ids
fit the 32064 vocabulary) + a CLIPImageProcessor from the published ``preprocessor_config.json`` +
LlavaProcessor, as ``defend/models/archs/llava.py`` builds its tiny model; batches go through the
library's collators, so every image is 576 tokens.

Stages (each in try/except: a failure is recorded as a string, the next stage still runs; a stage
that would start after ``--budget-s`` is skipped):

1. ``generate``: ``AutoregressiveVLM.generate`` (greedy, KV cache), batch 8, 32 new tokens:
   generated tokens/s (rows x language-model forwards / time, so an early eos is counted right)
   and samples/s.
2. ``purify``: ``defend.purify.masking.masked_generate(vlm, batch, 0.45, "saliency", "mean", 1, gen)``,
   batch 8: batches/s and samples/s.
3. ``train``: LoRA r=16 (alpha 32) on every linear layer of the language model (q,k,v,o,gate,up,down;
   ``defend.models.lora.apply_lora``), loss ``vlm.loss`` (the recipes' task loss), under DeepSpeed
   ZeRO-2 at world size 1 (bf16, torch AdamW: no JIT ops; ``defend.engine.engine.build_engine``);
   if DeepSpeed is missing or fails to start, plain ``torch.optim.AdamW`` (``"engine": "torch"``).
   Batch 4 x 1024 tokens, one 336x336 image each. tokens/s and MFU (formula in ``FLOPS_FORMULA``).

Exit status: 0 all stages ran, 2 some stage failed or was skipped (see ``errors`` in the JSON), 1 no
model could be built. Needs torch, transformers, peft (+ deepspeed for stage 3's engine) and the ``defend`` package.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the defend package of this tree
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

FIXTURE = ROOT / "tests" / "fixtures" / "real_configs" / "llava_1_5"
VICUNA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096)
# --smoke: the same config, shrunk (vocab kept: the embedding table and head are as published)
SMOKE_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, vocab_size=32064, max_position_embeddings=4096)
SMOKE_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=112, patch_size=14)
# --model llada_v --smoke: LLaDA-V's layout shrunk (vocab, image size and pinpoints kept)
SMOKE_LLADA_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
SMOKE_LLADA_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), first match of the device name wins
PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
         ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
         ("L40", 181.0), ("A6000", 155.0), ("L4", 121.0), ("A10", 125.0)]
CPU_NOMINAL_PEAK = 1.0  # --smoke on CPU: a nominal 1 TFLOP/s, only so the MFU field is filled

FLOPS_FORMULA = (
    "per optimizer step, B rows of S tokens, I images: "
    "decoder linears 4*N_dec*B*S (forward 2N + backward through activations 2N; the frozen base "
    "needs no weight gradient) + LoRA 6*N_lora*B*S (forward, activation and weight gradients) + "
    "attention 6*L*d*S^2*B (causal: forward QK^T and AV 2*S^2*d per layer, backward 2x forward) + "
    "lm_head 4*N_head*K (K = logit positions kept, the response tokens: vlm.loss uses logits_to_keep) + "
    "vision tower and projector forward only (frozen, no gradient reaches them): "
    "I*(2*N_vis_linear*T + 2*N_patch*(T-1) + 4*L_v*T^2*d_v + 2*N_proj*(T-1)), T = patches + CLS. "
    "Embedding lookups count 0. mfu = that / step time / peak; mfu_6n = the common 6*N_lm*B*S "
    "convention (N_lm = decoder linears + lm_head) over the same time and peak, for comparison."
)


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - START:7.1f}s] {message}", flush=True)


START = time.perf_counter()


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - START

    def exceeded(self) -> bool:
        return self.elapsed() > self.seconds


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "deepspeed"):
        try:
            module = __import__(name)
            out[name] = str(module.__version__)
        except Exception as err:  # deepspeed may be absent on the device machine
            out[name] = f"missing ({type(err).__name__}: {err})"
    out["cuda"] = str(torch.version.cuda)
    return out


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return CPU_NOMINAL_PEAK, "nominal (cpu smoke run)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS:
        if key in name:
            return value, f"table: '{key}' in '{name}'"
    return None, f"unknown device '{name}': pass --peak-tflops"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """GPU memory allocated at peak since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- model


def build_tokenizer():
    """The offline tiny BPE tokenizer (``tiny_tokenizer``); without easy_vqa, the same builder over
    a built-in word list."""
    from defend.config import TinyConfig

    try:
        from defend.models.tiny_components import tiny_tokenizer

        return tiny_tokenizer(TinyConfig()), "tiny_tokenizer"
    except ImportError as err:
        from defend.models.tiny_components import GENERAL_WORDS
        from defend.models.tokenizer import build_bpe_tokenizer

        corpus = [" ".join(sorted(set(GENERAL_WORDS)))] * 50
        return build_bpe_tokenizer(corpus, TinyConfig().vocab_size), f"general words ({err})"


def model_config(smoke: bool, tokenizer):
    """LLaVA-1.5-7B's published config, the text model as Vicuna-7B (or both shrunk, --smoke), its
    token ids set to the tokenizer's."""
    from transformers import LlavaConfig

    data = json.loads((FIXTURE / "config.json").read_text())
    data["text_config"].update(SMOKE_TEXT if smoke else VICUNA_7B)
    if smoke:
        data["vision_config"].update(SMOKE_VISION)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    data["text_config"].update(ids)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    data.update(image_token_index=image_id, image_token_id=image_id, pad_token_id=tokenizer.pad_token_id)
    data.pop("torch_dtype", None)
    data["text_config"].pop("torch_dtype", None)
    config = LlavaConfig.from_dict(data)
    for key in ("image_token_id", "image_token_index"):
        setattr(config, key, image_id)
    return config


def build_processor(tokenizer, config):
    from transformers import CLIPImageProcessor, LlavaProcessor

    settings = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    for key in ("image_processor_type", "processor_class"):
        settings.pop(key, None)
    size = config.vision_config.image_size
    settings.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(**settings),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random-init LlavaForConditionalGeneration built on ``device`` in ``dtype``, sdpa attention."""
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        try:
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers 4.x: torch_dtype
            model = LlavaForConditionalGeneration._from_config(config, torch_dtype=dtype,
                                                               attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def bench_config(args, *extra: str):
    from defend.config import load_config

    return load_config(None, [
        "model.dtype=bfloat16", f"eval.max_new_tokens={args.new_tokens}", f"train.max_length={args.seq_len}",
        f"train.micro_batch_size={args.train_batch}", "train.grad_accum=1", "train.lr=1e-4",
        "train.warmup_ratio=0.0", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", *extra,
    ])


def build_llada_v(args, device: torch.device, dtype: torch.dtype):
    """LLaDA-V at its published shape (or shrunk, --smoke), built on ``device``, as the masked-diffusion
    family with the settings ``defend convert llada_v`` writes."""
    from defend.models.convert import LLADA_MASK_ID, LLADA_V_BLOCKED_IDS
    from defend.models.diffusion import MaskedDiffusionVLM
    from tests.real_shapes import llada_v_real_shape

    log(f"building {'shrunk' if args.smoke else 'LLaDA-V-8B-shape'} model on {device} (bf16, sdpa)")
    shape = (dict(text_layers=2, vision_layers=2, sizes=SMOKE_LLADA_TEXT, vision_sizes=SMOKE_LLADA_VISION)
             if args.smoke else dict(text_layers=32, vision_layers=26))
    (model, processor, _), seconds = timed(lambda: llada_v_real_shape(**shape, device=device, dtype=dtype), device)
    model.eval().requires_grad_(False)
    block = min(32, args.new_tokens)
    cfg = bench_config(args, "model.family=mdlm", f"diffusion.mask_token_id={LLADA_MASK_ID}",
                       f"diffusion.blocked_token_ids={json.dumps(LLADA_V_BLOCKED_IDS).replace(' ', '')}",
                       "diffusion.labels=llada_v", f"diffusion.gen_length={args.new_tokens}",
                       f"diffusion.steps={args.new_tokens}", f"diffusion.block_length={block}",
                       f"diffusion.cache={args.cache}")
    return MaskedDiffusionVLM(model, processor, cfg), processor.tokenizer, "tiny_tokenizer + LLaDA tokens", \
        model.config, seconds


def param_counts(model) -> dict[str, int]:
    """Matmul parameter counts by part (the base model, before LoRA)."""
    lm = model.model.language_model
    vision = model.model.vision_tower
    linear = torch.nn.Linear
    counts = {
        "lm_params": sum(p.numel() for p in lm.parameters()) + model.lm_head.weight.numel(),
        "lm_decoder_linear_params": sum(m.weight.numel() for m in lm.modules() if isinstance(m, linear)),
        "lm_head_params": model.lm_head.weight.numel(),
        "vision_params": sum(p.numel() for p in vision.parameters()),
        "vision_linear_params": sum(m.weight.numel() for m in vision.modules() if isinstance(m, linear)),
        "vision_patch_params": sum(m.weight.numel() for m in vision.modules() if isinstance(m, torch.nn.Conv2d)),
        "projector_params": sum(m.weight.numel() for m in model.model.multi_modal_projector.modules()
                                if isinstance(m, linear)),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    counts["lm_matmul_params"] = counts["lm_decoder_linear_params"] + counts["lm_head_params"]
    return counts


def train_flops(counts: dict[str, int], config, rows: int, seq: int, kept: int, images: int,
                lora_params: int) -> dict[str, float]:
    """FLOPs of one LoRA step (``FLOPS_FORMULA``), by part; ``images``: tower inputs (anyres: crops)."""
    text, vis = config.text_config, config.vision_config
    patches = (vis.image_size // vis.patch_size) ** 2
    t = patches + int(config.model_type == "llava")  # CLIP's CLS token (SigLIP has none)
    parts = {
        "decoder_linear": 4.0 * counts["lm_decoder_linear_params"] * rows * seq,
        "lora": 6.0 * lora_params * rows * seq,
        "attention": 6.0 * text.num_hidden_layers * text.hidden_size * seq * seq * rows,
        "lm_head": 4.0 * counts["lm_head_params"] * kept,
        "vision_forward": images * (2.0 * counts["vision_linear_params"] * t
                                    + 2.0 * counts["vision_patch_params"] * patches
                                    + 4.0 * vis.num_hidden_layers * t * t * vis.hidden_size
                                    + 2.0 * counts["projector_params"] * patches),
    }
    parts["total"] = sum(parts.values())
    parts["six_n"] = 6.0 * counts["lm_matmul_params"] * rows * seq
    return parts


# ---------------------------------------------------------------- batches


WORDS = ("what color is the shape in this image a red blue green circle square triangle left right "
         "top bottom there is one big small yellow gray black white").split()


def random_images(n: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def samples(n: int, size: int, response_words: int, seed: int):
    from defend.data.samples import Sample

    images = random_images(n, size, seed)
    out = []
    for i, image in enumerate(images):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) + " ?"
        response = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(response_words))
        out.append(Sample(id=f"bench-{seed}-{i}", image=image, prompt=prompt, response=response, source="gpu_check"))
    return out


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, dtype=dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved


def train_batch(vlm, args, device, dtype):
    """Rows of exactly ``seq_len`` tokens: the collator truncates an over-long response to fit."""
    batch = vlm.train_collator()(samples(args.train_batch, args.image_size, args.seq_len, seed=1))
    return to_device(batch, device, dtype)


def prompt_batch(vlm, rows: int, args, device, dtype, seed: int):
    batch = vlm.generate_collator()(samples(rows, args.image_size, 0, seed=seed))
    return to_device(batch, device, dtype)


# ---------------------------------------------------------------- stages


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def repeat_timed(fn, device, warmup: int, repeats: int, budget: Budget, name: str) -> list[float]:
    """Times of ``repeats`` calls after ``warmup``; stops early (keeping at least one) past the budget."""
    for i in range(warmup):
        _, seconds = timed(fn, device)
        log(f"{name}: warm-up {i + 1}/{warmup} {seconds:.3f}s")
    times = []
    for i in range(repeats):
        _, seconds = timed(fn, device)
        times.append(seconds)
        log(f"{name}: {i + 1}/{repeats} {seconds:.3f}s")
        if budget.exceeded():
            log(f"{name}: budget reached, stopping after {len(times)} timed calls")
            break
    return times


def stage_generate(ctx) -> dict[str, Any]:
    vlm, args, device = ctx["vlm"], ctx["args"], ctx["device"]
    batch = prompt_batch(vlm, args.gen_batch, args, device, ctx["dtype"], seed=2)
    forwards = [0]
    handle = vlm.arch.language_model(vlm.base_model).register_forward_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        def call():
            forwards[0] = 0
            return vlm.generate(batch)

        reset_peak(device)
        times = repeat_timed(call, device, args.warmup, args.repeats, ctx["budget"], "generate")
    finally:
        handle.remove()
    seconds = sum(times) / len(times)
    # autoregressive: the last call's forwards (prefill gives token 1, each later forward one more);
    # masked diffusion: every answer position is written (gen_length), in ``steps`` forwards
    new_tokens = args.new_tokens if vlm.family == "mdlm" else forwards[0]
    return {"batch": args.gen_batch, "prompt_tokens": int(batch["input_ids"].shape[1]),
            "max_new_tokens": args.new_tokens, "new_tokens_per_row": new_tokens, "forwards": forwards[0],
            "timed_calls": len(times),
            "batch_s": round(seconds, 5), "tokens_per_s": round(args.gen_batch * new_tokens / seconds, 3),
            "samples_per_s": round(args.gen_batch / seconds, 4), "peak_memory_gb": peak_memory_gb(device)}


def stage_purify(ctx) -> dict[str, Any]:
    from defend.purify.masking import masked_generate

    vlm, args, device = ctx["vlm"], ctx["args"], ctx["device"]
    batch = prompt_batch(vlm, args.purify_batch, args, device, ctx["dtype"], seed=3)
    out: dict[str, Any] = {"batch": args.purify_batch, "mask_ratio": 0.45, "selection": "saliency",
                           "replacement": "mean", "saliency_samples": 1, "generator": "torch.Generator()"}
    generator = torch.Generator().manual_seed(0)
    reset_peak(device)
    try:  # as the library builds it (MaskedGenerator: a CPU generator)
        answers, seconds = timed(lambda: masked_generate(vlm, batch, 0.45, "saliency", "mean", 1, generator), device)
    except RuntimeError as err:
        if device.type == "cpu" or "generator" not in str(err).lower():
            raise
        out["cpu_generator_error"] = f"{type(err).__name__}: {err}"
        log(f"purify: a CPU torch.Generator() failed ({err}); retrying with one on {device}")
        generator = torch.Generator(device=device).manual_seed(0)
        out["generator"] = f"torch.Generator(device='{device}')"
        answers, seconds = timed(lambda: masked_generate(vlm, batch, 0.45, "saliency", "mean", 1, generator), device)
    log(f"purify: first call {seconds:.3f}s, {len(answers)} answers")
    times = repeat_timed(lambda: masked_generate(vlm, batch, 0.45, "saliency", "mean", 1, generator), device,
                         max(0, args.warmup - 1), args.repeats, ctx["budget"], "purify")
    seconds = sum(times) / len(times)
    out.update(prompt_tokens=int(batch["input_ids"].shape[1]), timed_calls=len(times), batch_s=round(seconds, 5),
               batches_per_s=round(1 / seconds, 4), samples_per_s=round(args.purify_batch / seconds, 4),
               peak_memory_gb=peak_memory_gb(device))
    return out


def ds_config(args) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": args.train_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.train_batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                                  "eps": 1e-8, "torch_adam": True}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


class TorchEngine:
    """The engine interface the step uses (``__call__``, ``backward``, ``step``), over torch AdamW."""

    def __init__(self, model, lr: float):
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self):
        self.module.train()

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def device_is_cuda(model) -> bool:
    return next(model.parameters()).device.type == "cuda"


def make_engine(model, cfg, args, total_steps: int, out: dict[str, Any]):
    """DeepSpeed ZeRO-2 through the library (``init_distributed`` + ``build_engine``); torch AdamW if
    DeepSpeed is missing or does not start."""
    if args.engine == "torch":
        out["engine"] = "torch"
        return TorchEngine(model, 1e-4)
    try:
        import deepspeed

        from defend.engine.distributed import init_distributed
        from defend.engine.engine import build_engine

        try:
            init_distributed()
        except Exception as err:  # the library's setup; else a group of one by hand, as it makes one
            out["init_distributed_error"] = f"{type(err).__name__}: {err}"
            log(f"train: defend init_distributed failed ({out['init_distributed_error']}); a group of one by hand")
            backend = "nccl" if device_is_cuda(model) else "gloo"
            if not torch.distributed.is_initialized():
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT="0")
                torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                                     world_size=1)
            deepspeed.init_distributed(dist_backend=backend)
        engine = build_engine(model, cfg, total_steps, ds_config(args))
        out["engine"] = "deepspeed"
        out["zero_stage"] = 2
        return engine
    except Exception as err:
        if args.engine == "deepspeed":
            raise
        out["deepspeed_error"] = f"{type(err).__name__}: {err}"
        log(f"train: DeepSpeed unavailable ({out['deepspeed_error']}); plain torch AdamW")
        out["engine"] = "torch"
        return TorchEngine(model, 1e-4)


def stage_train(ctx) -> dict[str, Any]:
    from defend.models.lora import apply_lora

    vlm, args, device, cfg = ctx["vlm"], ctx["args"], ctx["device"], ctx["cfg"]
    batch = train_batch(vlm, args, device, ctx["dtype"])
    rows, seq = batch["input_ids"].shape
    kept = int((batch["labels"] != -100).sum())  # response tokens, where vlm.loss keeps logits
    pixels = batch["pixel_values"]
    images = int(pixels.shape[0])
    crops = int(pixels.shape[0] * pixels.shape[1]) if pixels.dim() == 5 else images  # anyres: every crop
    out: dict[str, Any] = {"batch": rows, "seq_len": seq, "images": images, "crops": crops, "response_tokens": kept}
    if seq != args.seq_len:
        out["note"] = f"rows are {seq} tokens (asked {args.seq_len})"

    model = apply_lora(vlm.model, cfg.lora, quantized=False)
    vlm.model = model  # the wrapper's calls (vlm.loss) now see the adapters
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora_params = sum(p.numel() for _, p in trainable)
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in trainable})
    out.update(lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_params=lora_params, lora_targets=targets,
               lora_dtype=str(trainable[0][1].dtype))
    if set(targets) != set(LORA_TARGETS):
        out["note_targets"] = f"LoRA targets {targets}, expected {list(LORA_TARGETS)}"

    total = args.warmup + args.train_steps
    engine = make_engine(model, cfg, args, total, out)
    out["lora_dtype_in_engine"] = str(next(p for p in model.parameters() if p.requires_grad).dtype)
    engine.train()
    losses: list[float] = []

    def step():
        loss = vlm.loss(batch, engine)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))

    reset_peak(device)
    times = repeat_timed(step, device, args.warmup, args.train_steps, ctx["budget"], f"train[{out['engine']}]")
    seconds = sum(times) / len(times)
    flops = train_flops(ctx["counts"], ctx["config"], rows, seq, kept, crops, lora_params)
    peak = ctx["peak_tflops"]
    achieved = flops["total"] / seconds / 1e12
    out.update(
        timed_steps=len(times), step_s=round(seconds, 5), tokens_per_s=round(rows * seq / seconds, 2),
        samples_per_s=round(rows / seconds, 4), flops_per_step=flops["total"], flops_parts=flops,
        tflops=round(achieved, 4), mfu=round(achieved / peak, 6) if peak else None,
        mfu_6n=round(flops["six_n"] / seconds / 1e12 / peak, 6) if peak else None,
        loss=round(losses[-1], 5), losses_finite=all(math.isfinite(x) for x in losses),
        peak_memory_gb=peak_memory_gb(device),
    )
    return out


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, shrunk model, few steps (tests)")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip stages that would start after this")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by device)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto")
    p.add_argument("--stages", default="generate,purify,train")
    p.add_argument("--model", choices=("llava_1_5", "llada_v"), default="llava_1_5")
    p.add_argument("--cache", choices=("none", "prefix", "dual"), default="prefix",
                   help="--model llada_v: the sampler's KV cache (diffusion.cache)")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None, help="timed steps after the warm-up")
    p.add_argument("--gen-batch", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--purify-batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed generate / purify calls")
    p.add_argument("--warmup", type=int, default=None)
    args = p.parse_args(argv)
    defaults = (dict(train_batch=2, seq_len=160, train_steps=2, gen_batch=2, new_tokens=4, purify_batch=2,
                     repeats=1, warmup=1) if args.smoke else
                dict(train_batch=4, seq_len=1024, train_steps=8, gen_batch=8, new_tokens=32, purify_batch=8,
                     repeats=3, warmup=2))
    if args.model == "llada_v":  # a 384 px image is 1485 vision tokens (+27 newlines)
        defaults["seq_len"] = 1800 if args.smoke else 2048
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    return args


def write(out_path: Path, result: dict[str, Any]) -> None:
    result["elapsed_s"] = round(time.perf_counter() - START, 2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out_path)


def run_stage(name: str, fn, ctx, result, budget: Budget, out_path: Path) -> None:
    if budget.exceeded():
        result[name] = {"skipped": f"budget: {budget.elapsed():.0f}s > --budget-s {budget.seconds:.0f}"}
        result["errors"][name] = result[name]["skipped"]
        log(f"{name}: skipped ({result[name]['skipped']})")
        write(out_path, result)
        return
    log(f"{name}: start")
    started = time.perf_counter()
    try:
        result[name] = fn(ctx)
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
        result[name] = {"error": message, "traceback": traceback.format_exc()[-4000:]}
        result["errors"][name] = message
        log(f"{name}: FAILED {message}")
        traceback.print_exc()
        sys.stderr.flush()
    result[name]["stage_s"] = round(time.perf_counter() - started, 2)
    free_memory(ctx["device"])
    write(out_path, result)


def summary(result: dict[str, Any]) -> str:
    engine = result.get("train", {}).get("engine")
    lines = [f"device: {result.get('device')}  (smoke={result['smoke']}, engine={engine})"]
    g, p, t = result.get("generate", {}), result.get("purify", {}), result.get("train", {})
    if "tokens_per_s" in t:
        mfu = f"{100 * t['mfu']:.1f}%" if t.get("mfu") is not None else "n/a"
        lines.append(f"train   : {t['tokens_per_s']:.1f} tokens/s, {t['step_s']:.3f} s/step "
                     f"({t['batch']}x{t['seq_len']}), {t['tflops']:.1f} TFLOP/s, MFU {mfu} "
                     f"(6N convention {100 * (t.get('mfu_6n') or 0):.1f}%), peak {t['peak_memory_gb']} GB")
    if "tokens_per_s" in g:
        lines.append(f"generate: {g['tokens_per_s']:.1f} new tokens/s, {g['samples_per_s']:.2f} samples/s "
                     f"(batch {g['batch']}, {g['new_tokens_per_row']} tokens)")
    if "batches_per_s" in p:
        lines.append(f"purify  : {p['batches_per_s']:.3f} batches/s, {p['samples_per_s']:.2f} samples/s "
                     f"(batch {p['batch']}, saliency + masked generation at 0.45)")
    for name, message in result["errors"].items():
        lines.append(f"{name}: ERROR {message}")
    lines.append(f"elapsed {result['elapsed_s']} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path = Path(args.out)
    budget = Budget(args.budget_s)
    # a hung stage: dump every thread's stack and exit (the JSON of the finished stages is on disk)
    faulthandler.dump_traceback_later(args.budget_s + 45, exit=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    result: dict[str, Any] = {"smoke": args.smoke, "versions": versions(), "errors": {},
                              "args": vars(args), "flops_formula": FLOPS_FORMULA}
    log(f"versions {result['versions']}")
    if device.type == "cuda" and not torch.cuda.is_available():
        result["errors"]["setup"] = "no CUDA device (run with --smoke on a CPU machine)"
        write(out_path, result)
        print(summary(result), flush=True)
        return 1
    result["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"cpu ({platform.processor() or platform.machine()})")
    if device.type == "cuda":
        result["device_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    result["peak_tflops"], result["peak_source"] = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(0)
    ctx: dict[str, Any] = {"args": args, "device": device, "dtype": dtype, "budget": budget,
                           "peak_tflops": result["peak_tflops"]}
    try:
        if args.model == "llada_v":
            vlm, tokenizer, source, config, seconds = build_llada_v(args, device, dtype)
            model = vlm.model
        else:
            from defend.models.autoregressive import AutoregressiveVLM

            tokenizer, source = build_tokenizer()
            config = model_config(args.smoke, tokenizer)
            processor = build_processor(tokenizer, config)
            log(f"building {'shrunk' if args.smoke else 'LLaVA-1.5-7B-shape'} model on {device} (bf16, sdpa)")
            model, seconds = timed(lambda: build_model(config, device, dtype), device)
            vlm = AutoregressiveVLM(model, processor, bench_config(args))
        args.image_size = config.vision_config.image_size
        counts = param_counts(model)
        ctx.update(vlm=vlm, cfg=vlm.cfg, config=config, counts=counts)
        result["model"] = {"name": args.model, "family": vlm.family, "build_s": round(seconds, 2),
                           "tokenizer": source, "tokenizer_size": len(tokenizer),
                           "attn_implementation": model.config._attn_implementation, "dtype": str(dtype),
                           "image_tokens": (config.vision_config.image_size // config.vision_config.patch_size) ** 2,
                           "text": {k: getattr(config.text_config, k) for k in VICUNA_7B},
                           "vision": {k: getattr(config.vision_config, k) for k in SMOKE_VISION}, **counts}
        log(f"model built in {seconds:.1f}s: {counts['total_params'] / 1e9:.3f}B params "
            f"(language model {counts['lm_params'] / 1e9:.3f}B)")
    except Exception as err:
        result["errors"]["setup"] = f"{type(err).__name__}: {err}"
        result["setup_traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
        write(out_path, result)
        print(summary(result), flush=True)
        return 1
    write(out_path, result)
    stages = {"generate": stage_generate, "purify": stage_purify, "train": stage_train}
    for name in args.stages.split(","):
        run_stage(name, stages[name], ctx, result, budget, out_path)
    write(out_path, result)
    faulthandler.cancel_dump_traceback_later()
    print(summary(result), flush=True)
    print(f"wrote {out_path}", flush=True)
    return 0 if not result["errors"] else 2


if __name__ == "__main__":
    sys.exit(main())
