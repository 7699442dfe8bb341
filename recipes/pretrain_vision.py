"""Pre-train the vision encoder of a vision-language model on captioned images, before it learns language.

    defend run pretrain_vision --config demo_pretrain_vision

The encoder's mean-pooled features feed a linear layer that predicts which words each caption
contains (a bag-of-words, multi-label objective, Joulin et al. 2016). With
``pretrain_vision.reconstruct_weight`` each patch token also predicts its patch's pixels (MSE), and with
``pretrain_vision.texture_prob`` a share of the images is blended with random textures first: an
encoder that must describe what it sees, textures the captions never name included, as one
pre-trained on millions of varied images does (docs/pcr.md: what makes a blended trigger reach the
language model). The heads are thrown away; the
whole model is saved with its trained encoder, ready for language training with
``train.freeze_vision_tower=true``. Writes ``config.yaml``, ``pretrain_vision.log``,
``train_log.jsonl``, ``train_summary.json`` (with the final bag-of-words accuracy) and ``model/``.

Why: a random-init encoder trained only through a language model learns what is cheap (colour) and
not what needs spatial structure (shape); direct supervision of the encoder learns both (docs/demo.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from defend.atomic import write_json
from defend.config import Config
from defend.data import Sample, load_samples
from defend.data.bag_of_words import bag_of_words, caption_vocabulary
from defend.data.sampler import resumable_loader
from defend.engine.checkpoint import Checkpointer
from defend.engine.distributed import rank
from defend.engine.engine import build_engine, prepare_deepspeed, release_deepspeed
from defend.engine.loop import total_steps, train_loop, train_summary
from defend.models import load_model
from defend.models.saving import save_model_folder
from defend.models.vision import find_vision_tower
from defend.run_dir import start_run
from defend.seeds import PRETRAIN_FLIPS, PRETRAIN_TEXTURES, derive_seed, seed_everything

# a DeepSpeed engine like finetune: every launcher starts it once per rank (defend/runner.py)
LAUNCHERS = ("none", "torchrun", "deepspeed", "ray")
# what decides its output (defend/stage_cache.py: a stage reruns when one of these changes)
READS = ("seed", "plugins", "model", "tiny", "dataset", "lora", "quant", "train", "pretrain_vision", "deepspeed")
IGNORES = ("train.log_every", "train.report_to", "train.save_every", "train.keep_checkpoints", "train.resume")


class BagOfWordsClassifier(torch.nn.Module):
    """Vision encoder + a linear layer over the caption vocabulary; with ``patch_pixels`` also a linear
    layer from each patch token to its patch's pixels."""

    def __init__(self, tower: torch.nn.Module, arch, vocab_size: int, patch_pixels: int = 0):
        super().__init__()
        self.tower, self.arch = tower, arch
        self.head = torch.nn.Linear(arch.pooled_size(), vocab_size)
        self.decoder = torch.nn.Linear(arch.pooled_size(), patch_pixels) if patch_pixels else None

    def forward(self, **pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Word logits (N, vocab) and, with a decoder, each patch's pixels (N, patches, patch_pixels)."""
        if self.decoder is None:
            return self.head(self.arch.pooled_image_features(self.tower, pixels)), None
        tokens = self.arch.patch_tokens(self.tower, pixels)
        return self.head(tokens.mean(dim=1)), self.decoder(tokens)


def blend_textures(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, share: float, max_alpha: float,
                   generator: torch.Generator) -> torch.Tensor:
    """``values`` (N, C, H, W, or N, crops, C, H, W: normalised pixels) with about ``share`` of the images
    blended with a texture each: uniform noise at a grain of 1, 2, 4 or 8 px, at an alpha up to ``max_alpha``."""
    n, (c, h, w) = values.shape[0], values.shape[-3:]
    chosen = torch.rand(n, generator=generator) < share
    grains = torch.tensor([1, 2, 4, 8])[torch.randint(4, (n,), generator=generator)]
    alphas = torch.rand(n, generator=generator) * max_alpha
    out = values.clone()
    for i in chosen.nonzero().flatten().tolist():
        g = int(grains[i])
        texture = torch.rand(1, c, -(-h // g), -(-w // g), generator=generator)
        texture = torch.nn.functional.interpolate(texture, scale_factor=g, mode="nearest")[0, :, :h, :w]
        raw = values[i].float() * std + mean
        out[i] = (((1 - alphas[i]) * raw + alphas[i] * texture - mean) / std).to(values.dtype)
    return out


def patch_pixels(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, patches, C * patch * patch), patches in row-major order (a ViT's token order)."""
    return torch.nn.functional.unfold(images.float(), patch, stride=patch).transpose(1, 2)


class PretrainVisionRecipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def setup(self) -> None:
        cfg = self.cfg
        self.samples = load_samples(cfg.dataset)
        self.vocab = caption_vocabulary(self.samples, cfg.pretrain_vision.min_word_count)
        ds_config = prepare_deepspeed(cfg)  # before loading: under ZeRO-3 the model is built sharded
        self.vlm = load_model(cfg)
        tower = find_vision_tower(self.vlm.model)
        pv = cfg.pretrain_vision
        self.patch = self.vlm.arch.config.vision_config.patch_size if pv.reconstruct_weight else 0
        seed_everything(cfg.seed)  # the heads' random init (start_run seeds again, after the input checks)
        self.classifier = BagOfWordsClassifier(tower, self.vlm.arch, len(self.vocab), 3 * self.patch ** 2)
        first = self.collate(self.samples[: cfg.train.micro_batch_size])  # bad images fail before any output
        if pv.reconstruct_weight or pv.texture_prob:
            self.vlm.arch.whole_images(first["pixels"])  # an architecture without whole images says so here
        processor = self.vlm.processor.image_processor
        self.mean, self.std = (torch.tensor(getattr(processor, k), dtype=torch.float32).view(-1, 1, 1)
                               for k in ("image_mean", "image_std"))
        self.log = start_run(cfg, "pretrain_vision")
        self.log.info("%d captioned images; %d words to predict: %s", len(self.samples), len(self.vocab),
                      " ".join(self.vocab[:30]) + (" ..." if len(self.vocab) > 30 else ""))
        self.flips = torch.Generator().manual_seed(derive_seed(cfg.seed, PRETRAIN_FLIPS))
        self.textures = torch.Generator().manual_seed(derive_seed(cfg.seed, PRETRAIN_TEXTURES))
        self.total_steps = total_steps(cfg.train, len(self.samples))
        self.engine = build_engine(self.classifier, cfg, self.total_steps, ds_config)
        generators = {"hflip": self.flips, **({"textures": self.textures} if pv.texture_prob else {})}
        self.checkpoints = Checkpointer.for_run(cfg, generators=generators)
        self.start_step = self.checkpoints.restore(self.engine, cfg.train.resume)  # 0 on a fresh run
        self.loader = resumable_loader(self.samples, self.collate, cfg, self.start_step)
        self.correct: list[float] = []
        self.mse: list[float] = []

    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        images = [s.load_image() for s in samples]
        pixels = self.vlm.arch.process_images(self.vlm.processor.image_processor, images)  # + image_grid_thw, ...
        return {"pixels": pixels, "targets": bag_of_words([s.response for s in samples], self.vocab)}

    def loss(self, batch: dict) -> torch.Tensor:
        dtype = self.engine.module.head.weight.dtype
        pixels = {k: v.to(self.engine.device, dtype if v.is_floating_point() else v.dtype)
                  for k, v in batch["pixels"].items()}
        if self.cfg.pretrain_vision.hflip:
            flip = torch.rand(len(batch["targets"]), generator=self.flips) < 0.5
            pixels = self.vlm.arch.hflip(pixels, flip)
        pv = self.cfg.pretrain_vision
        if pv.texture_prob:
            values = pixels["pixel_values"]
            pixels["pixel_values"] = blend_textures(values.cpu(), self.mean, self.std, pv.texture_prob,
                                                    pv.texture_max_alpha, self.textures).to(values.device)
        targets = batch["targets"].to(self.engine.device)
        logits, patches = self.engine(**pixels)
        # exact-set accuracy: every caption word predicted and no other
        self.correct.append(((logits > 0) == (targets > 0)).all(dim=1).float().mean().item())
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        if patches is not None:
            mse = torch.nn.functional.mse_loss(patches.float(), patch_pixels(self.vlm.arch.whole_images(pixels), self.patch))
            self.mse.append(mse.item())
            loss = loss + pv.reconstruct_weight * mse
        return loss

    def train(self) -> dict:
        return train_loop(self.engine, iter(self.loader), self.loss, self.total_steps, self.cfg.train,
                          self.log, self.out / "train_log.jsonl", desc="pretrain_vision",
                          checkpoints=self.checkpoints, start_step=self.start_step)

    def save(self) -> Path:
        target = save_model_folder(self.vlm.model, self.out / "model", self.vlm.processor)
        self.log.info("saved %s", target)
        return target

    def cleanup(self) -> None:
        self.engine.destroy()
        release_deepspeed()


def recipe_main(cfg: Config) -> dict:
    recipe = PretrainVisionRecipe(cfg)
    recipe.setup()
    result = recipe.train()
    saved = recipe.save()
    recipe.cleanup()
    last = recipe.correct[-cfg.train.log_every:] or [float("nan")]  # none when resumed at the end
    extra = {}
    if cfg.pretrain_vision.reconstruct_weight:
        mse = recipe.mse[-cfg.train.log_every:] or [float("nan")]
        extra["reconstruction_mse"] = sum(mse) / len(mse)
    summary = train_summary(result, saved, bag_of_words_accuracy=sum(last) / len(last), vocabulary=recipe.vocab,
                            **extra)
    if rank() == 0:
        write_json(Path(cfg.output_dir) / "train_summary.json", summary)
    recipe.log.info("bag-of-words accuracy over the last %d steps: %.3f", len(last), summary["bag_of_words_accuracy"])
    return summary


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
