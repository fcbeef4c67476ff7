"""SimCLR pre-training of the U-T&T encoder on FLAIR #2 (aerial + Sentinel-2).

    python -m lcssl.main --config=configs/ssl_flair2.py --workdir=runs/ssl_flair2
    python -m lcssl.main --config=configs/ssl_flair2.py:ssl1 --workdir=runs/ssl1_flair2   # seminar SSL1
    python -m lcssl.main --config=configs/ssl_flair2.py:tiny --workdir=/tmp/ssl_tiny \
        --config.data_dir=/tmp/data/flair2                                            # seconds, synthetic

Presets: default (LARS, batch 256, warm-up + cosine, tau 0.1); ssl1 (seminar SSL1: 30 epochs,
batch 16, tau 0.1, SGD lr 0.001); tiny.
"""
from lcssl import configs as common

PRESETS = {"ssl1": common.seed_setup(epochs=30, batch_size=16, temperature=0.1)}


def get_config(arg=None):
    return common.build(dataset="flair2", task="simclr", arg=arg, presets=PRESETS)
