"""One module per training objective; `config.task` names one of them.

    task = tasks.get(config.task).build(ctx)    # -> tasks.base.Task; see base.py and docs/DESIGN.md

Adding an objective: a module here with USES_LABELS, default_config() and build(ctx), and its name
in NAMES. Its hyperparameters become `config.<name>.*` in every experiment config. A pre-training
objective is its loss, health and config on top of pretraining.build_task (byol.py is the example;
docs/DESIGN.md, "Tasks").
"""
from __future__ import annotations

import importlib
from types import ModuleType

from lcssl.errors import UserError
from lcssl.tasks.base import Context, Task, TrainState

# name -> module under lcssl.tasks; imported on first use.
NAMES = ("supervised", "simclr", "crossmodal", "vicreg", "dense", "byol", "masked_dates")


def get(name: str) -> ModuleType:
    """The task module called `name` (a ValueError naming the known ones otherwise)."""
    if name not in NAMES:
        raise UserError(f"config.task={name!r} is not a task; known: {', '.join(NAMES)} "
                         "(set --config.task)")
    return importlib.import_module(f"lcssl.tasks.{name}")


__all__ = ["NAMES", "Context", "Task", "TrainState", "get"]
