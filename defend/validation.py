"""Every check ``defend validate`` (and ``defend run``, before any work) makes of a config.

One function per check; each raises :class:`ConfigError` naming the key or file and the fix, or returns
warnings (things that may be right). :func:`validate_config` runs them all and reports every problem at
once. Nothing here loads weights: models are read from their config (built on the meta device) and the
adapter from its safetensors header.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from defend.config import Config, ConfigError
from defend.engine.reporting import check_report_to

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
ADAPTER_PREFIX = "base_model.model."  # peft's saved names: base_model.model.<module of the base model>...


# --- the launch -------------------------------------------------------------------------------------

def local_resources() -> tuple[int, int]:
    """(CPU cores this process may run on, GPUs it sees)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, torch.cuda.device_count()


def launch_world_size(cfg: Config) -> int:
    """Ranks of the run: nproc where this process launches them; in a rank (launcher=none, which the
    launchers append) the launcher's WORLD_SIZE; 1 in a lone process."""
    if cfg.launcher != "none":
        return cfg.nproc
    return int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else 1


def check_nproc(cfg: Config) -> None:
    """``nproc`` ranks must fit this machine: one GPU each where there are GPUs, else one CPU core each;
    an embedded Ray needs nproc x ray.cpus_per_worker cores and nproc x ray.gpus_per_worker GPUs."""
    if cfg.launcher == "none":
        return
    if cfg.nproc < 1:
        raise ConfigError(f"nproc: must be at least 1, got {cfg.nproc}.")
    cores, gpus = local_resources()
    if cfg.launcher == "ray":
        if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            return  # a cluster: its placement is checked (with a timeout) when the run starts
        need_cpus, need_gpus = cfg.nproc * cfg.ray.cpus_per_worker, cfg.nproc * cfg.ray.gpus_per_worker
        for what, need, have, per in (("CPU cores", need_cpus, cores, "ray.cpus_per_worker"),
                                      ("GPUs", need_gpus, gpus, "ray.gpus_per_worker")):
            if need > have:
                raise ConfigError(
                    f"nproc: launcher=ray with nproc={cfg.nproc} and {per}={getattr(cfg.ray, per.split('.')[1]):g}"
                    f" needs {need:g} {what}, this machine has {have}. Lower nproc or {per}, or join a cluster"
                    " with ray.address=auto.")
        return
    if gpus:
        if cfg.nproc > gpus:
            raise ConfigError(f"nproc: launcher={cfg.launcher} starts one rank per GPU; nproc={cfg.nproc} but this"
                              f" machine has {gpus} GPU{'s' * (gpus != 1)}. Set nproc={gpus} or fewer"
                              " (CUDA_VISIBLE_DEVICES decides which GPUs count).")
    elif cfg.nproc > cores:
        raise ConfigError(f"nproc: launcher={cfg.launcher} with no GPU runs one rank per CPU core; nproc={cfg.nproc}"
                          f" but this machine has {cores} CPU core{'s' * (cores != 1)} (and no GPU). Set"
                          f" nproc={cores} or fewer.")


def check_train_settings(cfg: Config) -> None:
    if cfg.train.log_every < 1:
        raise ConfigError(f"train.log_every: must be at least 1 (log every N steps), got {cfg.train.log_every};"
                          " set train.log_every=1 or more.")
    check_report_to(cfg.train.report_to)  # names in defend/engine/reporting.py, their packages installed
    if cfg.heartbeat_s < 0:
        raise ConfigError(f"heartbeat_s: seconds between progress lines off a terminal, got {cfg.heartbeat_s};"
                          " set heartbeat_s=60 (or 0 for no heartbeat).")


def check_dtype(cfg: Config) -> list[str]:
    """bfloat16 on a CPU without bf16 instructions is emulated: the demo's vision stage ran 27.5 samples/s
    there against 365 in float32 (AMD EPYC with AVX2 only, 2 cores, docs/demo.md)."""
    import torch

    if cfg.model.dtype != "bfloat16" or torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return []
    return [f"model.dtype=bfloat16 on a CPU without bf16 instructions ({torch.backends.cpu.get_cpu_capability()}):"
            " emulated, about 13x slower than float32 here; set model.dtype=float32 (another model: numbers differ)."]


def check_diffusion(cfg: Config) -> None:
    if cfg.model.family == "mdlm":
        from defend.models.diffusion_sampler import check_sampler_settings

        check_sampler_settings(cfg.diffusion)


def check_output_dir(cfg: Config) -> None:
    """``output_dir`` can be created and written: a probe file in its nearest existing ancestor."""
    target = Path(cfg.output_dir).expanduser().absolute()
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        where = "is" if ancestor == target else f"cannot be created: '{ancestor}' is"
        raise ConfigError(f"output_dir: '{target}' {where} a file, not a folder. Point output_dir at a folder"
                          " (it is created if missing).")
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".defend_write_probe_"):
            pass
    except OSError as err:
        what = "" if ancestor == target else f" cannot be created: its nearest existing folder '{ancestor}'"
        raise ConfigError(f"output_dir: '{target}'{what} is not writable ({err.strerror}). Choose an output_dir"
                          " you can write to, or fix the folder's permissions.") from None


# --- DeepSpeed JSON ---------------------------------------------------------------------------------

def read_ds_config(cfg: Config) -> tuple[dict[str, Any], Path]:
    """``cfg.deepspeed``'s JSON and its file."""
    from defend.engine.ds_config import DS_CONFIG_DIR, load_ds_config

    ds, path = load_ds_config(cfg.deepspeed), Path(cfg.deepspeed)
    path = path if path.suffix == ".json" else DS_CONFIG_DIR / f"{cfg.deepspeed}.json"
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object (its keys are DeepSpeed's), got"
                          f" {type(ds).__name__}.")
    return ds, path


class _KeysSeen(dict):
    """A dict that records every key read from it (get, [], in, keys() membership)."""

    def __init__(self, data: dict, seen: set[str]):
        super().__init__(data)
        self.seen = seen

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        seen, keys = self.seen, dict.keys(self)

        class Keys:
            def __contains__(self, key):
                seen.add(key)
                return key in keys

            def __iter__(self):
                return iter(keys)

            def __len__(self):
                return len(keys)

        return Keys()


@functools.lru_cache(maxsize=1)
def deepspeed_top_level_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed reads: those its own DeepSpeedConfig looks up while parsing a config,
    less the removed features it refuses, plus the two that ``deepspeed.initialize`` reads itself."""
    from deepspeed.runtime import config as ds_runtime

    seen: set[str] = set()
    ds_runtime.DeepSpeedConfig(_KeysSeen({"train_micro_batch_size_per_gpu": 1}, seen))
    removed = set(getattr(ds_runtime, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    return frozenset(k for k in seen if isinstance(k, str)) - removed | {"sequence_parallel_size", "data_parallel_size"}


def pydantic_keys(model: type) -> dict[str, type | None]:
    """The keys a DeepSpeed config model accepts (names and aliases) -> the nested model under each."""
    from pydantic import BaseModel

    keys: dict[str, type | None] = {}
    for name, field in model.model_fields.items():
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        for key in {name, field.alias} - {None}:
            keys[key] = nested[0] if nested else None
    return keys


def unknown_keys(section: dict, known: dict[str, type | None] | frozenset[str], prefix: str) -> list[str]:
    """'prefix.key' (did you mean ...) for each key of ``section`` not in ``known``; recurses into models."""
    found = []
    for key, value in section.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            found.append(f"'{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
        elif isinstance(known, dict) and known[key] is not None and isinstance(value, dict):
            found.extend(unknown_keys(value, pydantic_keys(known[key]), f"{prefix}{key}."))
    return found


def check_deepspeed_keys(cfg: Config) -> None:
    """Keys DeepSpeed does not know are ignored by it (``zero_optimisation``: silently ZeRO-0); refuse them,
    and the removed features DeepSpeed itself refuses, with the file named."""
    from deepspeed.runtime import config as ds_runtime
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds, path = read_ds_config(cfg)
    reject = getattr(ds_runtime, "_reject_removed_config_keys", None)
    if reject is not None:
        try:
            reject(ds)
        except ds_runtime.DeepSpeedConfigError as err:
            raise ConfigError(f"deepspeed: {path}: {err} Remove that block.") from None
    bad = unknown_keys(ds, deepspeed_top_level_keys(), "")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        bad += unknown_keys(zero, pydantic_keys(DeepSpeedZeroConfig), "zero_optimization.")
    if bad:
        one = len(bad) == 1
        raise ConfigError(f"deepspeed: {path} has {'a key' if one else 'keys'} DeepSpeed does not know:"
                          f" {', '.join(bad)}. DeepSpeed would ignore (or refuse) {'it' if one else 'them'}; fix the"
                          f" spelling or remove {'it' if one else 'them'}.")


def check_deepspeed_batch(cfg: Config) -> None:
    """The JSON's batch values must be what ``train.*`` makes them (the data loader batches by
    train.micro_batch_size): "auto", a missing key DeepSpeed derives, or a number, all as DeepSpeed
    resolves them at this run's world size."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds, path = read_ds_config(cfg)
    t, world = cfg.train, launch_world_size(cfg)
    expected = dict(zip(BATCH_KEYS, (t.micro_batch_size, t.grad_accum, t.micro_batch_size * t.grad_accum * world)))
    sources = dict(zip(BATCH_KEYS, ("train.micro_batch_size", "train.grad_accum",
                                    f"train.micro_batch_size x train.grad_accum x {world} rank{'s' * (world != 1)}")))
    given = {}
    for key in BATCH_KEYS:
        value = ds.get(key)
        if value == "auto":
            value = expected[key]
        elif value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"deepspeed: {path}: '{key}' must be an integer or \"auto\", got {value!r}.")
        given[key] = value
    resolved = SimpleNamespace(world_size=world, **given)
    try:  # DeepSpeed's own derivation of the missing values, and its consistency check
        DeepSpeedConfig._set_batch_related_parameters(resolved)
        DeepSpeedConfig._batch_assertion(resolved)
    except AssertionError as err:
        raise ConfigError(f"deepspeed: {path}: DeepSpeed refuses its batch values: {err}. Set"
                          f" {', '.join(BATCH_KEYS)} to \"auto\" (filled from train.*).") from None
    wrong = [f"'{key}' is {getattr(resolved, key)}" + ("" if ds.get(key) is not None else " (DeepSpeed derives it)")
             + f" but {sources[key]} = {expected[key]}" for key in BATCH_KEYS if getattr(resolved, key) != expected[key]]
    if wrong:
        raise ConfigError(f"deepspeed: {path}: {'; '.join(wrong)}. Set those keys to \"auto\" (filled from train.*)"
                          " or change train.micro_batch_size / train.grad_accum to match.")


def check_deepspeed_combination(cfg: Config) -> None:
    from defend.engine.ds_config import check_combination, load_ds_config

    check_combination(cfg, load_ds_config(cfg.deepspeed))


def check_objectives(cfg: Config) -> None:
    from defend.objectives import objective_names

    objective_names(cfg)


def check_attack(cfg: Config) -> None:
    """The trigger builds from its settings (a key image that is not there, TrojVLM without an inserted target)."""
    from defend.data.attacks import build_trigger

    build_trigger(cfg.attack)


# --- model, adapter, tokenizer ----------------------------------------------------------------------

def model_folder(cfg: Config, build_tiny: bool = False) -> Path | None:
    """The checked model folder; a tiny model only when ``build_tiny`` (it is built, cached, on first use)."""
    from defend.models.tiny import TINY_PATH

    if not cfg.model.path or (cfg.model.path == TINY_PATH and not build_tiny):
        return None
    from defend.models.loading import check_model_files

    return check_model_files(cfg)[0]


def check_model(cfg: Config) -> None:
    """A real checkpoint's folder, architecture and adapter folder (a tiny one is not built)."""
    model_folder(cfg)


@functools.lru_cache(maxsize=4)
def _meta_model(folder: str, stamp: float, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def meta_model(folder: Path, cfg: Config) -> Any:
    """The model ``folder`` describes, built on the meta device from its config.json (no weights, no memory):
    its module names are the ones peft saves adapters under, whatever the checkpoint's own key names."""
    config = folder / "config.json"
    try:
        return _meta_model(str(folder.resolve()), config.stat().st_mtime, cfg.model.trust_remote_code)
    except Exception as err:  # noqa: BLE001 -- whatever transformers raises: this config cannot build a model, so cannot load
        raise ConfigError(f"model.path: {config} does not describe a model transformers can build"
                          f" ({type(err).__name__}: {err}); check the file, or set model.trust_remote_code=true"
                          " if the model needs its own code.") from None


def adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an adapter's weights, from the safetensors header (or a meta-mapped .bin)."""
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 -- safe_open is no dict
    weights = adapter / "adapter_model.bin"
    if weights.is_file():
        import torch

        return {k: tuple(v.shape) for k, v in torch.load(weights, map_location="meta", weights_only=True).items()}
    raise ConfigError(f"model.adapter: '{adapter}' has no adapter_model.safetensors (or .bin); is the peft"
                      " save complete?")


def expected_adapter_shape(module: Any, kind: str, r: int) -> tuple[int, ...] | None:
    """What peft saves for ``kind`` (lora_A, lora_B, lora_embedding_A/B) on ``module``; None: not checked."""
    import torch

    if isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}.get(kind)
    if isinstance(module, torch.nn.Embedding):
        return {"lora_embedding_A": (r, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, r)}.get(kind)
    return None


def adapter_mismatches(model: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Each adapter tensor whose module is missing from ``model`` or whose shape does not fit it."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    found = []
    for key, shape in sorted(shapes.items()):
        name = key.removeprefix(ADAPTER_PREFIX)
        parts = name.split(".")
        kinds = [i for i, p in enumerate(parts) if p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")]
        if kinds:
            owner, kind = ".".join(parts[:kinds[-1]]), parts[kinds[-1]]
            if owner not in modules:
                found.append(f"'{owner}' (LoRA target) does not exist in the base")
                continue
            r = shape[0] if kind in ("lora_A", "lora_embedding_A") else shape[-1]
            want = expected_adapter_shape(modules[owner], kind, r)
            if want is not None and tuple(shape[:2]) != want:
                found.append(f"'{key}' is {list(shape)}, the base's {owner} needs {list(want)}")
        elif name in params and tuple(params[name].shape) != shape:  # modules_to_save: whole weights
            found.append(f"'{key}' is {list(shape)}, the base's {name} is {list(params[name].shape)}")
    return found


def _same_model_config(a: Path, b: Path) -> bool:
    def read(folder: Path) -> dict:
        data = json.loads((folder / "config.json").read_text())
        return {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")}

    try:
        return read(a) == read(b)
    except (OSError, ValueError):
        return False


def check_adapter(cfg: Config) -> list[str]:
    """``model.adapter`` must fit ``model.path``: every LoRA target present with the shapes the adapter holds
    (an error), and preferably be the base it names (a warning: folders move, hub ids name local copies)."""
    if not cfg.model.adapter:
        return []
    folder = model_folder(cfg, build_tiny=True)
    if folder is None:
        return []
    adapter = Path(cfg.model.adapter)
    try:
        settings = json.loads((adapter / "adapter_config.json").read_text())
    except ValueError as err:
        raise ConfigError(f"model.adapter: {adapter / 'adapter_config.json'} is not valid JSON ({err}).") from None
    named = settings.get("base_model_name_or_path") or ""
    wrong = adapter_mismatches(meta_model(folder, cfg), adapter_shapes(adapter))
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ConfigError(
            f"model.adapter: '{adapter}' does not fit model.path '{folder}': {'; '.join(wrong[:3])}{more}. The adapter"
            f" was trained on another base (its adapter_config.json names '{named}'); point model.path at that"
            " base, or use an adapter trained on this one.")
    if not named:
        return []
    named_path = Path(named).expanduser()
    if named_path.is_dir():
        if named_path.resolve() == folder.resolve() or _same_model_config(named_path, folder):
            return []
        why = "a folder with another config.json"
    elif named_path.name == folder.name:
        return []  # a hub id or a moved folder with this one's name
    else:
        why = "not this folder" + ("" if named_path.exists() else " (and not found here)")
    return [(f"model.adapter: '{adapter}' was trained on '{named}' ({why}); model.path is '{folder}'. Its shapes"
             " fit, so it will load; if model.path is not the base it was trained on, its behaviour is undefined.")]


def check_tokenizer(cfg: Config) -> None:
    """No token id of the tokenizer may fall outside the embedding table (an index error mid-run, or a
    device-side assert on GPU)."""
    folder = model_folder(cfg)
    if folder is None:
        return
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((folder / name).is_file() for name in tokenizer_files):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: the tokenizer in '{folder}' does not load ({err}).") from None
    model = meta_model(folder, cfg)
    tables = [m.weight.shape[0] for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    rows = min(tables)
    if len(tokenizer) > rows:
        raise ConfigError(
            f"model.path: the tokenizer in '{folder}' has {len(tokenizer)} tokens but the model's embedding table"
            f" has {rows} rows (text config vocab_size {model.config.get_text_config().vocab_size}): ids from"
            f" {rows} on have no embedding. Resize the embeddings (model.resize_token_embeddings(len(tokenizer)))"
            " and save the folder again, or use the tokenizer the model was saved with.")


# --- all of them ------------------------------------------------------------------------------------

CHECKS: tuple[Callable[[Config], list[str] | None], ...] = (
    check_train_settings, check_dtype, check_diffusion, check_nproc, check_output_dir, check_deepspeed_keys, check_deepspeed_batch,
    check_deepspeed_combination, check_objectives, check_attack, check_model, check_adapter, check_tokenizer,
)


def validate_config(cfg: Config) -> list[str]:
    """Run every check; raise one ConfigError listing every problem, or return the warnings."""
    errors: list[str] = []
    warnings: list[str] = []
    for check in CHECKS:
        try:
            warnings.extend(check(cfg) or [])
        except ConfigError as err:
            if str(err) not in errors:  # a bad model folder fails every model check alike
                errors.append(str(err))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))
    return warnings
