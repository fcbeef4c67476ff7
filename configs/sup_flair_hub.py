"""Supervised U-T&T segmentation on FLAIR-HUB (aerial RGBI + Sentinel-2, 19 classes) from random init.

    python -m data_prep build --layout=flair_hub --src=/path/to/FLAIR-HUB --out=data/flair_hub
    python -m lcssl.main --config=configs/sup_flair_hub.py --workdir=runs/sup_flair_hub
    python -m lcssl.main --config=configs/sup_flair_hub.py:tiny --workdir=/tmp/sup_hub_tiny \
        --config.data_dir=/tmp/data/flair_hub                                         # seconds, synthetic

Presets: default (SGD + momentum, warm-up + cosine, batch 64, 50 epochs); tiny. The card's official
metric (IGN's 15 scored classes) is reported beside the mIoU over all 19 (miou_official).
"""
from lcssl import configs as common


def get_config(arg=None):
    return common.build(dataset="flair_hub", task="supervised", arg=arg)
