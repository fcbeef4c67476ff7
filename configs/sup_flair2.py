"""Supervised U-T&T segmentation on FLAIR #2 from random initialisation (the baseline).

    python -m lcssl.main --config=configs/sup_flair2.py --workdir=runs/sup_flair2
    python -m lcssl.main --config=configs/sup_flair2.py:seed --workdir=runs/seed_sup_flair2  # seminar

Presets: default (SGD + momentum, warm-up + cosine, batch 64, 50 epochs); seed (seminar supervised
baseline: 30 epochs, batch 16, SGD lr 0.001); tiny.
"""
from lcssl import configs as common

PRESETS = {"seed": common.seed_setup(epochs=30, batch_size=16)}


def get_config(arg=None):
    return common.build(dataset="flair2", task="supervised", arg=arg, presets=PRESETS)
