"""The `defend` command: ls | cp | validate | run | submit | convert (recipes run through defend/runner.py).

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
import json
import shutil
import sys
from pathlib import Path

from defend.config import ConfigError, dump_config, load_config, resolve_config_path
from defend.engine.preemption import STOPPED_EXIT_CODE, TrainingStopped
from defend.progress import quiet_library_bars
from defend.runner import (
    RECIPES_DIR,
    USER_ERRORS,
    check_launcher,
    config_names,
    load_recipe_main,
    parse_with_overrides,
    recipe_names,
    resolve_recipe,
    validate,
)


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


def cmd_validate(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    print(dump_config(cfg), end="")
    print(f"# {args.config}: valid")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    recipe = resolve_recipe(args.recipe)  # a wrong name fails here, not in every rank
    check_launcher(recipe, cfg.launcher)
    validate(cfg)  # the launcher's ranks (launcher=none) check again, at their world size
    if cfg.launcher == "none":
        quiet_library_bars()
        load_recipe_main(recipe)(cfg)
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
