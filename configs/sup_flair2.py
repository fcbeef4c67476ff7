"""Supervised U-T&T segmentation on FLAIR #2 from random initialisation (the baseline).

    python -m lcssl.main --config=configs/sup_flair2.py --workdir=runs/sup_flair2
    python -m lcssl.main --config=configs/sup_flair2.py:seed --workdir=runs/seed_sup_flair2  # seminar

Presets: default (SGD + momentum, warm-up + cosine, batch 64, 50 epochs); seed (seminar supervised
baseline: 30 epochs, batch 16, SGD lr 0.001); tiny.
"""
import sys, pathlib  # noqa: E401  (configs are loaded by path; make `configs.common` importable)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # noqa: E402

PRESETS = {"seed": common.seed_setup(epochs=30, batch_size=16)}


def get_config(arg=None):
    return common.build(dataset="flair2", mode="supervised", arg=arg, presets=PRESETS)
