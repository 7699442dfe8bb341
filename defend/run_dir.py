"""A run's output folder: the resolved config, a log, and the artifacts recipes write."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from defend.atomic import write_text
from defend.config import Config, dump_config
from defend.seeds import seed_everything

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_run(cfg: Config, recipe: str) -> logging.Logger:
    """Create ``output_dir``, write ``config.yaml``, log to ``<recipe>.log`` and the console."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_config(cfg))
    logger = logging.getLogger(f"defend.{recipe}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.FileHandler(out / f"{recipe}.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    seed_everything(cfg.seed)
    logger.info("run %s -> %s", recipe, out)
    return logger
