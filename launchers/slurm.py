"""``defend submit slurm``: render an sbatch template of ``slurm/`` with the run's settings, write it
into the run's output folder with the run's frozen config, and hand it to ``sbatch``.

    defend submit slurm finetune --config my.yaml slurm.nodes=2 slurm.gpus_per_node=8 slurm.partition=gpu
    defend submit slurm purify --config my_purify.yaml slurm.nodes=4 --dry-run   # print, submit nothing
    sbatch <output_dir>/slurm/finetune.sbatch                                    # the same job again, by hand

Templates (``slurm.template``): ``train_deepspeed`` (torchrun on every node, one DeepSpeed rank per
GPU), ``ray_cluster`` (a Ray cluster on the allocation, the recipe submitted to it as a Ray job),
``purify_ray`` (the same, the actor pool sized to the allocation), or a path to your own.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from defend.atomic import write_text
from defend.config import Config, ConfigError, dump_config
from defend.shipped import SLURM_DIR, require

TEMPLATES = ("train_deepspeed", "ray_cluster", "purify_ray")


def template_path(recipe: str, cfg: Config) -> Path:
    name = cfg.slurm.template
    if name == "auto":
        stem = Path(recipe).stem
        name = ("purify_ray" if stem == "purify" else
                "ray_cluster" if stem == "disp" or cfg.launcher == "ray" else "train_deepspeed")
    if name in TEMPLATES:
        return require(SLURM_DIR, f"slurm.template={name}") / f"{name}.sbatch"
    if Path(name).is_file():
        return Path(name)
    raise ConfigError(f"slurm.template: '{name}' is neither a shipped template ({', '.join(TEMPLATES)}, auto)"
                      " nor a file. Pick one of those, or the path of your own copy.")


def frozen_config(cfg: Config, template: Path) -> Config:
    """The config the job runs: absolute output folder; what the template's processes need."""
    frozen = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()))
    if template.name == "train_deepspeed.sbatch":
        return dataclasses.replace(frozen, launcher="none")  # torchrun made the ranks already
    # the Ray templates submit from the first node, which sees the code and the files already
    ray = dataclasses.replace(cfg.ray, working_dir=None, job_python=cfg.slurm.python or sys.executable)
    return dataclasses.replace(frozen, ray=ray)


def srun_container(cfg: Config, workdir: Path) -> str:
    """pyxis's srun options as shell words, each quoted: the body of the ``SRUN_CONTAINER=( ... )`` array."""
    if not cfg.slurm.container_image:
        return ""
    parts = [f"--container-image={cfg.slurm.container_image}", f"--container-workdir={workdir}"]
    if cfg.slurm.container_mounts:
        parts.append(f"--container-mounts={cfg.slurm.container_mounts}")
    return shlex.join(parts)


# What an ``#SBATCH`` line cannot carry: sbatch splits its options at whitespace, drops a ``#`` and what
# follows as a comment, and gives quotes and backslashes meanings of its own; a newline ends the comment
# line that bash skips, so what follows it would run as shell.
SBATCH_REFUSED = re.compile(r"[\s'\"\\#]|[\x00-\x1f\x7f]")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SLURM_TIME = re.compile(r"(?i)(\d+-)?\d+(:\d+){0,2}|unlimited|infinite")


def sbatch_value(key: str, value: object, fix: str = "") -> str:
    """``value`` as it goes on an ``#SBATCH`` line, or a ConfigError naming ``key``."""
    text = str(value)
    bad = SBATCH_REFUSED.search(text)
    if bad or not text:
        what = "is empty" if not text else f"holds {bad.group()!r}"
        raise ConfigError(f"{key}: {text!r} {what}, which an #SBATCH line cannot carry (no whitespace, newline,"
                          f" control character, quote, backslash or '#'); {fix or 'pick a value without it'}.")
    return text


def sbatch_args(args: list[str]) -> list[str]:
    """``slurm.sbatch_args`` as ``#SBATCH`` lines' bodies: each entry split like a shell word list, every
    word checked."""
    lines = []
    for i, arg in enumerate(args):
        if CONTROL.search(str(arg)):  # a newline would start a line of its own, outside the #SBATCH one
            sbatch_value(f"slurm.sbatch_args[{i}]", arg, "write one sbatch option per entry, on one line")
        try:
            words = shlex.split(str(arg))
        except ValueError as err:
            raise ConfigError(f"slurm.sbatch_args[{i}]: {arg!r} does not split into words ({err}); write one"
                              " sbatch option per entry, e.g. --qos=high.") from None
        if not words or not words[0].startswith("-"):
            raise ConfigError(f"slurm.sbatch_args[{i}]: {arg!r} is not an sbatch option; write one per entry,"
                              " starting with '-', e.g. --qos=high.")
        lines.append(" ".join(sbatch_value(f"slurm.sbatch_args[{i}]", w) for w in words))
    return lines


def check(cfg: Config) -> None:
    s = cfg.slurm
    for key in ("nodes", "cpus_per_task"):
        if getattr(s, key) < 1:
            raise ConfigError(f"slurm.{key}: must be at least 1, got {getattr(s, key)}.")
    if s.gpus_per_node < 0 or (s.procs_per_node is not None and s.procs_per_node < 1):
        raise ConfigError("slurm.gpus_per_node must be >= 0 and slurm.procs_per_node >= 1 (or null).")
    if not SLURM_TIME.fullmatch(str(s.time)):
        raise ConfigError(f"slurm.time: {s.time!r} is not a Slurm time limit; write minutes, MM:SS, HH:MM:SS,"
                          " D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED (e.g. slurm.time=04:00:00).")
    for key in ("job_name", "mem", "partition", "account"):
        if getattr(s, key):  # null or empty: the template leaves the line out
            sbatch_value(f"slurm.{key}", getattr(s, key))
    sbatch_value("output_dir", Path(cfg.output_dir).resolve(), "pick a folder whose path has none of them")
    sbatch_args(s.sbatch_args)


def render(recipe: str, cfg: Config, config_path: Path, template: Path) -> str:
    import jinja2

    check(cfg)
    workdir = Path.cwd()
    s = cfg.slurm
    recipe_arg = str(Path(recipe).resolve()) if recipe.endswith(".py") else recipe
    job_name = sbatch_value("slurm.job_name", s.job_name or f"defend-{Path(recipe).stem}",
                            "set slurm.job_name, or name the recipe file without it")
    workdir = Path(sbatch_value("the working directory", workdir, "submit from a folder whose path has none of them"))
    # every value below that reaches shell is quoted; the #SBATCH ones were checked above
    values = {
        "job_name": job_name, "nodes": s.nodes, "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node, "procs_per_node": s.procs_per_node or max(1, s.gpus_per_node),
        "mem": s.mem, "time": s.time, "partition": s.partition, "account": s.account,
        "log": config_path.parent / "slurm-%j.out", "signal_seconds": s.signal_seconds,
        "max_requeues": s.max_requeues, "workdir": workdir, "sbatch_args": sbatch_args(s.sbatch_args),
        "setup": s.setup,
        "python": shlex.quote(s.python or sys.executable), "srun_container": srun_container(cfg, workdir),
        "lib": shlex.quote(str(SLURM_DIR / "lib")), "recipe": shlex.quote(recipe_arg),
        "config": shlex.quote(str(config_path)),
    }
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(template.read_text()).render(**values)
    except jinja2.TemplateError as err:
        raise ConfigError(f"slurm.template: cannot render '{template}': {err}") from None


def submit_slurm(recipe: str, cfg: Config, *, dry_run: bool = False, wait: bool = False) -> int:
    """Write ``<output_dir>/slurm/{config.yaml,<recipe>.sbatch}`` and ``sbatch`` it; return sbatch's status
    (with ``wait``: the job's)."""
    template = template_path(recipe, cfg)
    frozen = frozen_config(cfg, template)
    folder = Path(frozen.output_dir) / "slurm"
    config_path = folder / "config.yaml"
    script = render(recipe, cfg, config_path, template)
    script_path = folder / f"{Path(recipe).stem}.sbatch"
    if dry_run:
        print(f"# {script_path} (dry run: nothing written or submitted)")
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("sbatch is not on PATH: submit from a Slurm login node (or print the script with"
                          " --dry-run and submit it there).")
    write_text(config_path, dump_config(frozen))
    write_text(script_path, script)
    script_path.chmod(0o755)
    command = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script_path)]
    if wait:  # the job id is printed at once, sbatch returns with the job's exit status
        return subprocess.run(command).returncode
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {script_path}: {done.stderr.strip()}. Fix the slurm.* keys"
                          " (partition, account, time, gpus_per_node) and submit again.")
    job = done.stdout.strip().split(";")[0]
    print(f"submitted batch job {job}: {script_path}\nlog: {folder / f'slurm-{job}.out'}")
    return 0
