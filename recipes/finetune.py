"""Fine-tune a vision-language model of either family: full, LoRA or QLoRA, on a DeepSpeed engine.

    defend run finetune --config finetune_tiny_mllm train.max_steps=50
    defend run finetune --config finetune_tiny_mllm deepspeed=zero3 launcher=torchrun nproc=2

Reads (image, prompt, response) samples, trains on the family's task loss wrapped by the objectives
of ``objective.name`` (``pcr``, ``abl``: defense objectives, ``defend/objectives/``), and writes into
``output_dir``: ``config.yaml``, ``finetune.log``, ``train_log.jsonl`` (loss and each objective term
per logged step), ``metrics.json`` (every step's loss and terms), ``checkpoints/``
(every ``train.save_every`` steps and on SIGTERM/SIGUSR1; a rerun resumes from the newest), and
the result: ``adapter/`` (peft format) for LoRA/QLoRA or ``model/`` (save_pretrained) for full
training. Any number of ranks, any ZeRO stage (``deepspeed=``): the same file. With ``model.adapter``
(LoRA) that adapter is trained further instead of a new one (e.g. the victim, tuned on clean rows).
"""
from __future__ import annotations

from pathlib import Path


from defend.atomic import write_json
from defend.config import Config
from defend.data import load_samples
from defend.data.manifest import verify_dataset_file
from defend.data.sampler import resumable_loader
from defend.engine.checkpoint import Checkpointer
from defend.engine.distributed import rank
from defend.engine.engine import build_engine, prepare_deepspeed, release_deepspeed
from defend.engine.loop import total_steps, train_loop, train_summary
from defend.models import load_model
from defend.models.lora import apply_lora
from defend.models.saving import save_model_folder
from defend.models.vision import find_vision_tower
from defend.objectives import TrainingContext, TrainingObjective
from defend.run_dir import start_run

# any number of ranks: every launcher starts it once per rank (defend/runner.py)
LAUNCHERS = ("none", "torchrun", "deepspeed", "ray")
# what decides its output (defend/stage_cache.py: a stage reruns when one of these changes)
READS = ("seed", "plugins", "model", "tiny", "dataset", "lora", "quant", "train", "diffusion", "objective", "deepspeed")
IGNORES = ("train.log_every", "train.report_to", "train.save_every", "train.keep_checkpoints", "train.resume")


class FinetuneRecipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.dataset.name == "jsonl":
            verify_dataset_file(cfg.dataset.path)  # a poison/purify run's train.jsonl: its folder as written
        self.samples = load_samples(cfg.dataset)
        ds_config = prepare_deepspeed(cfg)  # before loading: under ZeRO-3 the model is built sharded
        continued = bool(cfg.model.adapter) and cfg.lora.enabled  # model.adapter: that adapter is trained further
        self.vlm = load_model(cfg, train_adapter=continued)
        collate = self.vlm.train_collator()
        probe = collate(self.samples[: cfg.train.micro_batch_size])  # bad rows or lengths fail before any output
        self.objective = TrainingObjective(TrainingContext(cfg, self.vlm, self.samples, collate))
        self.objective.check(probe)  # so do objective settings that do not fit the data
        self.log = start_run(cfg, "finetune")
        if cfg.train.freeze_vision_tower:
            find_vision_tower(self.vlm.model).requires_grad_(False)
        if cfg.lora.enabled and not continued:
            self.vlm.model = apply_lora(self.vlm.model, cfg.lora, quantized=cfg.quant.load_in_4bit or cfg.quant.load_in_8bit)
        trainable = sum(p.numel() for p in self.vlm.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.vlm.model.parameters())
        self.log.info("%d samples; trainable params %d of %d", len(self.samples), trainable, total)
        self.total_steps = total_steps(cfg.train, len(self.samples))
        self.log.info("objective: task loss%s", "".join(f" + {o.name}" for o in self.objective.objectives))
        self.engine = build_engine(self.vlm.model, cfg, self.total_steps, ds_config)
        self.checkpoints = Checkpointer.for_run(cfg, self.objective.generators, {"objective": self.objective})
        self.start_step = self.checkpoints.restore(self.engine, cfg.train.resume)  # 0 on a fresh run
        self.objective.start_at(self.start_step)
        self.loader = resumable_loader(self.samples, collate, cfg, self.start_step)

    def train(self) -> dict:
        result = train_loop(self.engine, iter(self.loader), lambda batch: self.objective(batch, self.engine),
                            self.total_steps, self.cfg.train, self.log, self.out / "train_log.jsonl",
                            desc="finetune", checkpoints=self.checkpoints, start_step=self.start_step)
        if rank() == 0:
            write_json(self.out / "metrics.json", {"first_step": self.start_step + 1, "loss": result["losses"],
                                                   "terms": result["terms"]})
        return result

    def save(self) -> Path:
        lora = self.cfg.lora.enabled
        target = save_model_folder(self.vlm.model, self.out / ("adapter" if lora else "model"),
                                   None if lora else self.vlm.processor, engine=self.engine,
                                   settings_from=self.cfg.model.path)  # a converted base's own settings
        self.log.info("saved %s", target)
        return target

    def cleanup(self) -> None:
        self.engine.destroy()
        release_deepspeed()


def recipe_main(cfg: Config) -> dict:
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    result = recipe.train()
    saved = recipe.save()
    recipe.cleanup()
    summary = train_summary(result, saved)
    if rank() == 0:
        write_json(Path(cfg.output_dir) / "train_summary.json", summary)
    return summary


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
