"""SimCLR pre-training of the U-T&T encoder on the unlabelled Hameln patches.

    python -m lcssl.main --config=configs/ssl_hameln.py --workdir=runs/ssl_hameln
    python -m lcssl.main --config=configs/ssl_hameln.py:ssl2 --workdir=runs/ssl2_hameln   # seminar SSL2
    python -m lcssl.main --config=configs/ssl_hameln.py:ssl3 --workdir=runs/ssl3_hameln   # seminar SSL3

Presets: default (LARS, batch 256, warm-up + cosine, tau 0.1); ssl2 (40 epochs, batch 16, tau 0.1,
SGD lr 0.001); ssl3 (40 epochs, batch 8, tau 0.7); tiny.
"""
from lcssl import configs as common

PRESETS = {
    "ssl2": common.seed_setup(epochs=40, batch_size=16, temperature=0.1),
    "ssl3": common.seed_setup(epochs=40, batch_size=8, temperature=0.7),
}


def get_config(arg=None):
    return common.build(dataset="hameln", task="simclr", arg=arg, presets=PRESETS)
