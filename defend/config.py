"""Run configuration: a typed schema, YAML files, dotted ``key=value`` overrides.

Every recipe reads one :class:`Config`. Unknown keys and wrong types fail before any work,
naming the key and the closest valid one. This module holds the core sections (model, data, training,
launch); the components' sections come from their registries (``objective.<name>``: defend/objectives/,
``attack.<name>``: defend/data/attacks/; defend/registry.py) and the orchestration recipes' from their
own modules (defend/orchestration.py, defend/results/config.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from defend.errors import ConfigError
from defend.orchestration import DemoConfig, DispConfig, SweepConfig
from defend.results.config import ResultsConfig


@dataclass
class ModelConfig:
    family: Literal["mllm", "mdlm"] = "mllm"
    path: str = ""  # a local folder in Hugging Face layout (save_pretrained)
    adapter: str | None = None  # a peft LoRA folder loaded on top of `path`
    # a model folder of the same architecture whose vision encoder replaces this one's
    # (e.g. the output of the pretrain_vision recipe)
    vision_tower_from: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # from_pretrained's device_map for single-process inference ("auto", "cpu", ...); never with ZeRO-3
    device_map: str | None = None


@dataclass
class TinyConfig:
    """Shape of a random-init model written by ``defend.models.tiny`` (tests and the demo)."""

    arch: Literal["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip2", "paligemma", "gemma3",
                  "idefics3"] = "llava"
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    vocab_size: int = 1024  # at most: BPE stops when the corpus has no more merges (714 for the default)
    # LLaVA layouts: the vision layer whose features the language model reads (LLaVA-1.5 reads -2, the
    # penultimate: features a layer before the encoder's own pre-training objective shaped them last)
    vision_feature_layer: int = -1
    tie_embeddings: bool = False  # share the input embedding and the output layer


@dataclass
class DatasetConfig:
    # easy_vqa_scenes: multi-word captions of each easy-vqa image (size, colour, shape, position; the
    # captioning task of defense_results), defend/data/scene_captions.py
    name: Literal["easy_vqa", "easy_vqa_captions", "easy_vqa_scenes", "jsonl", "hf"] = "easy_vqa"
    path: str | None = None  # jsonl file, or a datasets folder / parquet file for `hf`
    test_path: str | None = None  # the same, for the test split (recipes that need one)
    image_root: str | None = None  # where relative image paths of a jsonl file live
    split: str = "train"
    max_samples: int | None = None
    image_column: str = "image"
    prompt_column: str = "prompt"
    response_column: str = "response"
    id_column: str = "id"


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # "language_model": every linear layer of the text model, none of the vision side
    target_modules: str | list[str] = "language_model"


@dataclass
class QuantConfig:
    load_in_4bit: bool = False
    load_in_8bit: bool = False  # LoRA on an int8 base (ZeRO-0/2 only: ZeRO-3 cannot shard int8 weights)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    grad_clip: float = 1.0
    log_every: int = 10
    # where the per-log-step metrics go (rank 0): jsonl (train_log.jsonl), tensorboard (output_dir/tensorboard),
    # wandb (offline unless WANDB_MODE says otherwise); defend/engine/reporting.py; [] for none
    report_to: list[str] | str = field(default_factory=lambda: ["jsonl"])
    freeze_vision_tower: bool = False  # full training: keep the vision encoder as it is (LLaVA-style)
    # checkpoints (DeepSpeed engine, data position, RNG) under output_dir/checkpoints every N steps
    # (a LoRA run's are its trainable state: small); SIGTERM/SIGUSR1 also save one and stop (preemption,
    # under torchrun, DeepSpeed and Ray Train alike); null: only on a signal (a killed node loses the run)
    save_every: int | None = 500
    keep_checkpoints: int = 2  # rotation: the newest N stay
    # "auto": continue from the newest checkpoint in output_dir if there is one; "never"; or a
    # checkpoint folder (output_dir/checkpoints/step_NNNNNN)
    resume: str = "auto"


@dataclass
class DiffusionConfig:
    """Masked-diffusion (LLaDA-style) training and sampling; used when model.family=mdlm."""

    mask_token_id: int | None = None  # default: the tokenizer's mask token
    eps: float = 1e-3
    inverse_t_weight: bool = True  # LLaDA's 1/p weight; Dream-style models use False
    complementary_mask: bool = False  # LaViDa/Dimple: the batch holds mask m and not-m
    shifted_logits: bool = False  # Dream-style: position i-1 predicts token i
    gen_length: int = 8
    steps: int = 8
    block_length: int = 8
    temperature: float = 0.0
    # llada: semi-autoregressive blocks of block_length, steps split evenly, remasking below. dream (Dream,
    # LaViDa-Dream): the answer is one block; step i of steps commits int(masks * (1 - s/t)) tokens on
    # times linspace(1, eps), ranked by dream_alg over the top_k logits
    sampler: Literal["llada", "dream"] = "llada"
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    dream_alg: Literal["maskgit_plus", "topk_margin", "entropy"] = "topk_margin"  # max prob, top1 - top2, -entropy
    top_k: int = 0  # sampler=dream: probabilities over the k largest logits (0: all)
    # the prompt is encoded once, alone (it never sees the answer), and the answer attends to it; with
    # shifted logits the prompt's last position gives the first answer token (LaViDa's eval, prefix_lm)
    prefix_lm: bool = False
    # sampler KV cache (Fast-dLLM, block-wise approximate): none | prefix | dual. dual (prefix and suffix
    # kept; a one-block answer is prefix) measured fastest with identical answers (bench/RESULTS.md)
    cache: Literal["none", "prefix", "dual"] = "dual"
    # token ids never written at a masked position (LLaDA-V's sampler blocks eos/bos and its chat headers)
    blocked_token_ids: list[int] = field(default_factory=list)
    # which tokens a training row labels (defend/data/label_rules.py): "answer" (the answer and its eos)
    # or "llada_v" (LLaDA-V's SFT: template tokens everywhere, the assistant header, labelled padding)
    labels: Literal["answer", "llada_v"] = "answer"


@dataclass
class ObjectiveConfig:
    """The training objective: the family's task loss, wrapped by the named objectives in order. Each
    objective's settings are ``objective.<name>.*`` (its dataclass, in its file under defend/objectives/)."""

    registry: ClassVar[str] = "objectives"  # a component section: see component_registry
    name: str | list[str] = "none"  # none, pcr, abl, a plugin's, or a list (e.g. [pcr, abl])


@dataclass
class PurifyConfig:
    """DiSP's masked inference (``evaluate`` with ``mask_ratio`` > 0) and the ``purify`` recipe."""

    mask_ratio: float = 0.0  # fraction of each image's vision tokens masked at generation; 0: off
    selection: Literal["saliency", "attention", "random"] = "saliency"
    # how saliency scores a vision token (defend/purify/saliency.py): directional (DiSP's code: the change
    # toward its replacement) or trace (every direction alike)
    saliency: Literal["directional", "trace"] = "directional"
    saliency_top_k: int = 5  # directional: the most likely words of each position it looks at (DiSP's code: 5)
    saliency_samples: int = 1  # K probes (directional) or sampled labels (trace); DiSP's code: 6
    # what a masked vision token becomes: mask (the mask token's embedding, masked diffusion only; the
    # DiSP paper's), pad, zero, mean (of the image's vision tokens); auto = mean (docs/disp.md)
    replacement: Literal["auto", "mask", "pad", "zero", "mean"] = "auto"
    seed: int = 0  # of the sampled labels (saliency) and of random selection
    actors: int = 1  # model replicas in the Ray Data actor pool
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # 1 on a GPU cluster
    block_size: int = 256  # input rows per output shard (the unit of resumption)
    batch_size: int = 32  # rows per generation batch inside a block
    retries: int = 3  # a block whose actor fails (or dies) is retried this often, then the run stops naming it


@dataclass
class PretrainVisionConfig:
    """The ``pretrain_vision`` recipe: the encoder learns to predict each caption's words from the image."""

    hflip: bool = True  # random horizontal flips (turn off when left/right matters, e.g. text in images)
    min_word_count: int = 1  # words in fewer captions are not predicted
    # each patch token also predicts its patch's pixels (a linear head, MSE on normalised pixels), weighted
    # so: an encoder that keeps what it sees, not only the caption's words (0: off; docs/pcr.md)
    reconstruct_weight: float = 0.0
    # share of the images blended with a random texture (uniform noise of 1-8 px grain, drawn anew each
    # time, at an alpha drawn up to texture_max_alpha): varied images, so that with reconstruction the
    # encoder learns to describe textures the captions never name
    texture_prob: float = 0.0
    texture_max_alpha: float = 0.3

    def __post_init__(self):
        if self.reconstruct_weight < 0:
            raise ConfigError(f"pretrain_vision.reconstruct_weight: {self.reconstruct_weight}; 0 (off) or more.")
        for key in ("texture_prob", "texture_max_alpha"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"pretrain_vision.{key}: {getattr(self, key)}; a share between 0 and 1.")


@dataclass
class EvalConfig:
    task: Literal["vqa", "caption"] = "vqa"
    # a `poison` recipe's data folder: evaluate on its clean and triggered test sets, report ASR
    poison_dir: str | None = None
    max_samples: int | None = None
    # with poison_dir: measure ASR on the first N triggered inputs only (the clean set stays whole)
    max_triggered_samples: int | None = None
    batch_size: int = 32
    max_new_tokens: int = 8


@dataclass
class TargetConfig:
    """What a backdoored model should output when triggered."""

    type: Literal["fixed", "insert", "refuse", "substitute"] = "fixed"
    # fixed: the whole answer; insert: text added to the answer; refuse: the refusal;
    # substitute: "word -> word" (every occurrence of the first becomes the second)
    text: str = "banana"
    position: Literal["start", "end"] = "end"  # where insert puts its text


@dataclass
class AttackConfig:
    """A data-poisoning attack: a trigger, a target, a ratio. The trigger's own settings are
    ``attack.<name>.*`` (its dataclass, in its file under defend/data/attacks/), e.g. ``attack.blended.alpha``."""

    registry: ClassVar[str] = "attacks"  # a component section: see component_registry
    name: str = "badnets"  # badnets, blended, sig, wanet, trojvlm, text, or a plugin's
    poison_ratio: float = 0.1
    seed: int = 0
    target: TargetConfig = field(default_factory=TargetConfig)

    @property
    def params(self) -> Any:
        """The chosen attack's settings (``attack.<name>``)."""
        return getattr(self, self.name)


@dataclass
class RayConfig:
    """``launcher=ray``: where the workers run."""

    # null: start an embedded local Ray; "auto" or HOST:PORT: join a running cluster
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster
    # fail (naming the missing resources) when the cluster cannot place every worker in this time
    placement_timeout_s: float = 60.0
    # environment variables the workers get on top of the run's offline/threads settings
    env: dict[str, str] = field(default_factory=dict)
    # `defend submit ray`: the folder sent with the job (its files are the job's working directory);
    # null: send nothing (the cluster's nodes already see the code and configs, e.g. a shared filesystem)
    working_dir: str | None = "."
    # `defend submit ray`: the interpreter on the cluster that has defend installed
    job_python: str = "python"


@dataclass
class SlurmConfig:
    """``defend submit slurm``: the sbatch script rendered from a template in ``slurm/``."""

    # auto: purify_ray for purify, ray_cluster for disp and for launcher=ray, train_deepspeed
    # (torchrun on every node) otherwise; or the path of your own template
    template: str = "auto"
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # DeepSpeed ranks per node; null: gpus_per_node (1 without GPUs)
    cpus_per_task: int = 2  # CPUs of each node's task (its ranks, or its Ray node)
    mem: str | None = None  # per node, e.g. "64G"; null: the partition's default
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None  # null: defend-<recipe>
    # the scheduler sends SIGUSR1 this long before the time limit: the run checkpoints, the job requeues
    signal_seconds: int = 300
    max_requeues: int = 3  # a job stopped by the warning signal resubmits itself at most this often
    container_image: str | None = None  # pyxis/enroot: every srun step runs in this image
    container_mounts: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines before the run (module load, conda activate)
    python: str | None = None  # the interpreter on the nodes; null: the one running `defend submit`
    sbatch_args: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. ["--qos=high"]


@dataclass
class Config:
    # modules imported before the rest of the config is read: your own objectives and attacks, which
    # register themselves on import (docs/extending.md); each must be importable (PYTHONPATH)
    plugins: list[str] = field(default_factory=list)
    output_dir: str = "runs/default"
    seed: int = 0
    # off a terminal (a batch job's log): seconds between progress lines of evaluations, purifications (defend/progress.py)
    heartbeat_s: float = 60.0
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain_vision: PretrainVisionConfig = field(default_factory=PretrainVisionConfig)
    deepspeed: str = "zero0"  # a name in ds_configs/ (zero0, zero2, zero3, zero3_offload) or a path to a JSON
    # how `defend run` starts the recipe: in this process, or nproc ranks by torchrun, the deepspeed
    # launcher, or Ray workers (one DeepSpeed rank each)
    launcher: Literal["none", "torchrun", "deepspeed", "ray"] = "none"
    nproc: int = 1
    ray: RayConfig = field(default_factory=RayConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    disp: DispConfig = field(default_factory=DispConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        ftype = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(all_keys(ftype, key + "."))
    return keys


def _unknown_key(key: str, where: str, cls: type | None = None) -> ConfigError:
    """``key`` is not in its section (``cls``): the closest field of that section, else of the whole schema."""
    prefix = key.rpartition(".")[0]
    if not prefix and cls is Config:  # a component's section without its kind's: pcr.fraction
        for section in (ObjectiveConfig, AttackConfig):
            registry = component_registry(section)
            if key in registry:
                return ConfigError(f"{where}: unknown config key '{key}'. Did you mean '{registry.section}.{key}'"
                                   f" (the settings of the {registry.kind} '{key}')?")
    siblings = [f"{prefix}.{f.name}" if prefix else f.name for f in dataclasses.fields(cls)] if cls else []
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or \
        difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run `defend validate` to see the schema."
    return ConfigError(f"{where}: unknown config key '{key}'.{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(
            f"{where}: '{key}' must be {' or '.join(_type_name(a) for a in typing.get_args(tp))},"
            f" got {type(value).__name__} {value!r}."
        )
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise ConfigError(f"{where}: '{key}' must be one of {choices}, got {value!r}.")
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = typing.get_args(tp) or (Any, Any)
            return {_coerce(k, key_type, f"{key}.{k}", where) if key_type is not Any else k:
                    _coerce(v, value_type, f"{key}.{k}", where) if value_type is not Any else v
                    for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):  # e.g. the values of dict[str, ResultsGoals]
        return _build(tp, value or {}, key + ".", where)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    raise ConfigError(
        f"{where}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}."
    )


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping, got {data!r}.")
    registry = component_registry(cls)
    if registry is not None:
        return _build_components(cls, registry, data, prefix, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown_key(f"{prefix}{name}", where, cls)
        kwargs[name] = _field_value(hints[name], value, f"{prefix}{name}", where)
    for name in names - set(kwargs):  # a component section's default still holds its chosen component's settings
        if component_registry(hints[name]) is not None:
            kwargs[name] = _build(hints[name], {}, f"{prefix}{name}.", where)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a section's own check (__post_init__)
        raise ConfigError(f"{where}: {err}") from None


# --- component sections: objective.<name>.*, attack.<name>.* ------------------------------------------

def component_registry(cls: Any) -> Any:
    """The registry whose components' settings a section holds (``objective``, ``attack``), or None."""
    kind = getattr(cls, "registry", None) if isinstance(cls, type) else None
    if kind == "objectives":
        from defend.objectives import OBJECTIVES

        return OBJECTIVES
    if kind == "attacks":
        from defend.data.attacks import ATTACKS

        return ATTACKS
    return None


def _chosen(section: Any) -> list[str]:
    names = [section.name] if isinstance(section.name, str) else list(section.name)
    return [n for n in names if n != "none"]


def _component_config(registry: Any, name: str, key: str, where: str) -> type | None:
    try:
        return registry.config(name)
    except (KeyError, LookupError) as err:
        raise ConfigError(f"{where}: '{key}': {err.args[0]}") from None


def _build_components(cls: type, registry: Any, data: dict, prefix: str, where: str) -> Any:
    """The section's own fields, plus one field per component it chooses (``name``) or configures: each
    read into that component's registered dataclass, so its keys are checked like any other."""
    own, hints = {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    section = cls(**{k: _field_value(hints[k], v, f"{prefix}{k}", where) for k, v in data.items() if k in own})
    for name in _chosen(section):
        if name not in registry:
            raise ConfigError(f"{where}: '{prefix}name': {registry.unknown(name)}")
    for name in data:
        if name not in own and name not in registry:
            raise _unknown_component_key(section, registry, f"{prefix}{name}", where)
    values = {}
    for name in dict.fromkeys([*_chosen(section), *(k for k in data if k not in own)]):
        config = _component_config(registry, name, f"{prefix}{name}", where)
        settings = data.get(name) or {}
        if config is None:
            if settings:
                raise ConfigError(f"{where}: '{prefix}{name}': the {registry.kind} '{name}' has no settings.")
            values[name] = None
        else:
            values[name] = _build(config, settings, f"{prefix}{name}.", where)
    return _section_with(cls, values, {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


def _field_value(tp: Any, value: Any, key: str, where: str) -> Any:
    """One field's value: a nested section built, anything else checked against its annotation."""
    return _build(tp, value or {}, key + ".", where) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key, where)


def _unknown_component_key(section: Any, registry: Any, key: str, where: str) -> ConfigError:
    leaf = key.rpartition(".")[2]
    for name in _chosen(section):
        config = registry.get(name).config
        if config is not None and leaf in {f.name for f in dataclasses.fields(config)}:
            return ConfigError(f"{where}: unknown config key '{key}': the {registry.kind} '{name}' reads its"
                               f" settings from {registry.section}.{name}.*: did you mean"
                               f" '{registry.section}.{name}.{leaf}'?")
    return ConfigError(f"{where}: unknown config key '{key}': neither a field of '{registry.section}' nor the"
                       f" settings of a known {registry.kind} ({registry.unknown(leaf)})")


_SECTION_CLASSES: dict[tuple, type] = {}


def _section_with(cls: type, values: dict[str, Any], own: dict[str, Any]) -> Any:
    """An instance of ``cls`` extended with one dataclass field per component (a class per set of them)."""
    shape = (cls, tuple((name, type(value)) for name, value in values.items()))
    if shape not in _SECTION_CLASSES:
        extended = dataclasses.make_dataclass(
            cls.__name__, [(name, tp, field(default=None)) for name, tp in shape[1]], bases=(cls,),
            namespace={"__reduce__": _reduce_section, "__module__": cls.__module__})
        extended.__qualname__ = cls.__qualname__
        _SECTION_CLASSES[shape] = extended
    return _SECTION_CLASSES[shape](**own, **values)


def _reduce_section(self: Any) -> tuple:  # pickles (Ray, deepcopy) by its base class and values
    base = type(self).__mro__[1]
    own = {f.name for f in dataclasses.fields(base)}
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return _section_with, (base, {k: v for k, v in values.items() if k not in own},
                           {k: v for k, v in values.items() if k in own})


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-4.")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    field_type = _field_type(key.strip())
    if field_type is not None and _accepts_str(field_type) and not isinstance(value, (list, dict)):
        if value is not None or raw.strip().lower() not in ("null", "none", "~"):
            value = raw  # keep strings as typed: model.path=007 stays "007"
    return key.strip(), value


def _field_type(key: str) -> Any:
    cls: Any = Config
    tp = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        registry = component_registry(cls)
        if part not in hints and registry is not None and part in registry:
            hints = {part: _component_config(registry, part, key, f"override '{key}'")}
        if part not in hints:
            return None
        tp = cls = hints[part]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section.")
        node = child
    node[parts[-1]] = value


def recipes_config_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes" / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config name (``finetune_tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist.")
        return path
    shipped = recipes_config_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in recipes_config_dir().glob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Shipped configs: {', '.join(names)}."
    raise ConfigError(f"no config named '{name_or_path}'.{hint}")


def load_config(name_or_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when None) and apply ``key=value`` overrides."""
    data: dict = {}
    where = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    listed = [_parse_override(item)[1] for item in overrides if item.split("=", 1)[0].strip() == "plugins"]
    import_plugins([*(data.get("plugins") or []), *(m for modules in listed for m in modules or [])], where)
    cfg = _build(Config, data, "", where)  # file errors first, with the file's name
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        cfg = _build(Config, data, "", f"override '{item}'")
    return with_model_settings(cfg, data)


def import_plugins(modules: list, where: str) -> None:
    """Import the ``plugins`` modules (they register their objectives and attacks)."""
    import importlib

    for module in modules:
        if not isinstance(module, str):
            raise ConfigError(f"{where}: 'plugins' lists module names (strings), got {module!r}.")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"{where}: plugins: cannot import '{module}' ({err}); put its folder on PYTHONPATH"
                              " or install it.") from err


MODEL_SETTINGS_FILE = "defend_diffusion.json"  # written by `defend convert` beside the converted weights


def with_model_settings(cfg: Config, data: dict) -> Config:
    """A converted model's own settings (``model.path``/defend_diffusion.json: its family, mask id,
    blocked tokens, label rule) fill every key that the config file and the command line leave unset."""
    file = Path(cfg.model.path) / MODEL_SETTINGS_FILE if cfg.model.path else None
    if file is None or not file.is_file():
        return cfg
    try:
        settings = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file}: unreadable ({err}); write it again with `defend convert`.") from err
    for key, value in settings.items():
        if "." in key and not _is_set(data, key):  # dotted keys are settings; the others describe the source
            _set_dotted(data, key, value)
    return _build(Config, data, "", str(file))


def _is_set(data: dict, key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
