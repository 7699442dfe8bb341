"""The `defend` command: ls | cp | validate | run | submit.

    defend ls                                   recipes and shipped configs
    defend cp finetune ./my_finetune.py         copy a recipe (or config) out to adapt it
    defend validate finetune_tiny_mllm train.lr=1e-4
    defend run finetune --config finetune_tiny_mllm train.max_steps=20
    defend run ./my_finetune.py --config my.yaml
    defend submit slurm finetune --config my.yaml slurm.nodes=2 slurm.gpus_per_node=8 [--dry-run]
    defend submit ray purify --config my.yaml ray.address=http://HEAD:8265 output_dir=/shared/runs/p1
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from defend.config import ConfigError, dump_config, load_config, recipes_config_dir, resolve_config_path
from defend.data.samples import DataError
from defend.engine.preemption import STOPPED_EXIT_CODE, TrainingStopped
from defend.progress import quiet_library_bars

RECIPES_DIR = recipes_config_dir().parent
USER_ERRORS = (ConfigError, DataError)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_names() -> list[str]:
    return sorted(p.stem for p in recipes_config_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"recipe file '{path}' does not exist.")
        return path
    if name_or_path in recipe_names():
        return RECIPES_DIR / f"{name_or_path}.py"
    close = difflib.get_close_matches(name_or_path, recipe_names(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Recipes: {', '.join(recipe_names())}."
    raise ConfigError(f"no recipe named '{name_or_path}'.{hint}")


def load_recipe_main(path: Path) -> Callable:
    spec = importlib.util.spec_from_file_location(f"defend_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "recipe_main"):
        raise ConfigError(f"recipe '{path}' defines no recipe_main(cfg).")
    return module.recipe_main


def run_recipe(recipe: str, config: str | None, overrides: list[str]) -> dict:
    """Run a recipe (name or file) on a config (name or file) with overrides; return its result."""
    cfg = load_config(config, overrides)
    return load_recipe_main(resolve_recipe(recipe))(cfg)


def cmd_ls(_: argparse.Namespace) -> None:
    print("recipes:")
    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        doc = (load_doc(RECIPES_DIR / f"{name}.py") or "").splitlines()
        print(f"  {name:<{width}}  {doc[0] if doc else ''}")
    print("configs:")
    for name in config_names():
        print(f"  {name}")


def load_doc(path: Path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


def cmd_cp(args: argparse.Namespace) -> None:
    if args.name in recipe_names():
        source = RECIPES_DIR / f"{args.name}.py"
    else:
        source = resolve_config_path(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise ConfigError(f"'{dest}' already exists; pick another destination.")
    shutil.copyfile(source, dest)
    print(f"copied {source.name} -> {dest}")


def validate(cfg) -> None:
    """Every check of defend.validation, before any work: errors raise, warnings go to stderr."""
    from defend.validation import validate_config

    for warning in validate_config(cfg):
        print(f"defend: warning: {warning}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    print(dump_config(cfg), end="")
    print(f"# {args.config}: valid")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate(cfg)  # the launcher's ranks (launcher=none) check again, at their world size
    if cfg.launcher == "none":
        quiet_library_bars()
        load_recipe_main(resolve_recipe(args.recipe))(cfg)
        return 0
    resolve_recipe(args.recipe)  # a wrong name fails here, not in every rank
    if cfg.launcher == "ray":
        from launchers.ray_train import run_on_ray

        return run_on_ray(args.recipe, args.config, args.overrides, cfg)
    from launchers.local import run_local

    return run_local(cfg.launcher, cfg.nproc, args.recipe, args.config, args.overrides)


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    resolve_recipe(args.recipe)  # a wrong name fails here, not on the cluster
    if args.where == "slurm":
        from launchers.slurm import submit_slurm

        return submit_slurm(args.recipe, cfg, dry_run=args.dry_run, wait=args.wait)
    if args.dry_run or args.wait:
        raise ConfigError("--dry-run and --wait are for `defend submit slurm`; `submit ray` always streams the"
                          " job's logs and returns its exit status.")
    from launchers.ray_job import submit_ray

    return submit_ray(args.recipe, args.config, args.overrides, cfg)


def cmd_convert(args: argparse.Namespace) -> None:
    from defend.models.convert import convert_llada_v
    from defend.models.convert_lavida import convert_lavida_dream

    converter = {"llada_v": convert_llada_v, "lavida_dream": convert_lavida_dream}[args.kind]
    target = converter(args.source, args.target, vision_config=args.vision_config, image_token_id=args.image_token_id)
    settings = json.loads((target / "defend_diffusion.json").read_text())
    overrides = " ".join(f"{k}={json.dumps(v).replace(' ', '')}" for k, v in settings.items() if "." in k)
    print(f"converted {args.source} -> {target}\nrun it with: model.path={target}\n(its defend_diffusion.json"
          f" supplies {overrides}; a config file or the command line may override any of them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes and configs").set_defaults(func=cmd_ls)
    cp = sub.add_parser("cp", help="copy a recipe or config to adapt it")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.set_defaults(func=cmd_cp)
    validate = sub.add_parser("validate", help="check a config without running it")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*", metavar="key=value")
    validate.set_defaults(func=cmd_validate)
    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("recipe", help="a recipe name (defend ls) or a recipe .py file")
    run.add_argument("--config", required=True, help="a config name (defend ls) or a .yaml file")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", help="run a recipe on a Slurm or Ray cluster")
    submit.add_argument("where", choices=["slurm", "ray"])
    submit.add_argument("recipe", help="a recipe name (defend ls) or a recipe .py file")
    submit.add_argument("--config", required=True, help="a config name (defend ls) or a .yaml file")
    submit.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch script, submit nothing")
    submit.add_argument("--wait", action="store_true", help="slurm: wait for the job, return its exit status")
    submit.add_argument("overrides", nargs="*", metavar="key=value")
    submit.set_defaults(func=cmd_submit)
    convert = sub.add_parser("convert", help="turn a checkpoint that needs its authors' package into a"
                                             " standard transformers folder (once)")
    convert.add_argument("kind", choices=["llada_v", "lavida_dream"])
    convert.add_argument("source", help="the published folder (config.json + safetensors + tokenizer)")
    convert.add_argument("target", help="the folder to write")
    convert.add_argument("--vision-config", help="a SigLIP config.json when the tower is not so400m-384")
    convert.add_argument("--image-token-id", type=int, help="the id of <image> (default: added to the tokenizer)")
    convert.set_defaults(func=cmd_convert)
    return parser


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse, letting ``key=value`` overrides stand before or after ``--config``."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parse_with_overrides(parser, argv)
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        return args.func(args) or 0
    except USER_ERRORS as err:
        print(f"defend: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"defend: {stopped}", file=sys.stderr)
        return STOPPED_EXIT_CODE


def recipe_entry(recipe_main: Callable) -> None:
    """``python recipes/<name>.py --config X key=value ...``: run a recipe file directly."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args, extra = parse_with_overrides(parser, None)
    args.overrides = list(args.overrides) + extra
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        quiet_library_bars()
        recipe_main(cfg)
    except USER_ERRORS as err:
        print(f"defend: error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stopped:
        print(f"defend: {stopped}", file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)


if __name__ == "__main__":
    sys.exit(main())
