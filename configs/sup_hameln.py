"""Supervised U-T&T segmentation on Hameln from random initialisation.

    python -m lcssl.main --config=configs/sup_hameln.py --workdir=runs/sup_hameln
    python -m lcssl.main --config=configs/sup_hameln.py:seed --workdir=runs/seed_sup_hameln  # seminar

Presets: default (SGD + momentum, warm-up + cosine, batch 64, 50 epochs); seed (seminar supervised
Hameln run: 50 epochs, batch 16, SGD lr 0.001); tiny.
"""
from lcssl import configs as common

PRESETS = {"seed": common.seed_setup(epochs=50, batch_size=16)}


def get_config(arg=None):
    return common.build(dataset="hameln", task="supervised", arg=arg, presets=PRESETS)
