"""The registry of raw dataset layouts: build, synth, the CLI and lcssl/configs.py read it.

Adding a layout: one module with `LAYOUT` (data_prep.patch.Layout: list_patches, read_patch,
metadata, the synthetic spec and its Writer), one entry here, and its configs/*_<name>.py.
"""
from __future__ import annotations

import importlib

from data_prep.patch import Layout

# name -> module holding LAYOUT; imported on first use (build's worker processes import only theirs).
MODULES = {"flair2": "data_prep.flair2", "hameln": "data_prep.hameln", "flair_hub": "data_prep.flair_hub"}
NAMES = tuple(MODULES)


def get(name: str) -> Layout:
    """The layout called `name`; ValueError lists the known ones."""
    if name not in MODULES:
        raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(NAMES)}")
    layout = importlib.import_module(MODULES[name]).LAYOUT
    assert layout.name == name, (layout.name, name)
    return layout
