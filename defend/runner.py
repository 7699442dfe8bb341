"""Running a recipe: find it (a shipped name or a file), check its config, run it in this process.

Every caller goes through here: the CLI (``defend run``; it hands a launcher the same command for each
rank), the launchers' workers, the orchestration recipes (demo, defense_results, disp, disp_sweep) and
``python recipes/<name>.py``. A recipe is a module with ``recipe_main(cfg)``; it may declare the
launchers it runs under (``LAUNCHERS = ("none", "torchrun", "deepspeed", "ray")``; default: ``none``
only, one process: an orchestration, or a recipe that starts its own workers, like purify).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from defend.config import ConfigError, load_config, recipes_config_dir
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


def recipe_launchers(path: Path) -> tuple[str, ...]:
    """The launchers a recipe file declares (``LAUNCHERS = (...)``, read without importing it)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAUNCHERS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ("none",)


def check_launcher(path: Path, launcher: str) -> None:
    supported = recipe_launchers(path)
    if launcher not in supported:
        what = "runs as one process" if supported == ("none",) else "does not run under it"
        raise ConfigError(
            f"launcher={launcher}: the {path.stem} recipe {what} (it supports {', '.join(supported)}); run it with"
            f" launcher={supported[0]} (a launcher would start nproc copies of it writing into one output_dir).")


def load_recipe_main(path: Path) -> Callable:
    spec = importlib.util.spec_from_file_location(f"defend_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "recipe_main"):
        raise ConfigError(f"recipe '{path}' defines no recipe_main(cfg).")
    return module.recipe_main


def run_recipe(recipe: str, config: str | None, overrides: list[str]) -> dict:
    """Run a recipe (name or file) on a config (name or file) with overrides in this process; its result."""
    cfg = load_config(config, overrides)
    return load_recipe_main(resolve_recipe(recipe))(cfg)


def validate(cfg) -> None:
    """Every check of defend.validation, before any work: errors raise, warnings go to stderr."""
    from defend.validation import validate_config

    for warning in validate_config(cfg):
        print(f"defend: warning: {warning}", file=sys.stderr)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse, letting ``key=value`` overrides stand before or after ``--config``."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, extra


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
