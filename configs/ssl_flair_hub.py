"""SimCLR pre-training of the U-T&T encoder on FLAIR-HUB (aerial RGBI + Sentinel-2).

    python -m lcssl.main --config=configs/ssl_flair_hub.py --workdir=runs/ssl_flair_hub
    python -m lcssl.main --config=configs/ssl_flair_hub.py:tiny --workdir=/tmp/ssl_hub_tiny \
        --config.data_dir=/tmp/data/flair_hub                                         # seconds, synthetic

Presets: default (LARS, batch 256, warm-up + cosine, tau 0.1); tiny. Pre-trains on the train split
(FLAIR-HUB labels every patch; `--config.split=unlabelled` where a build has unlabelled ones).
"""
from lcssl import configs as common


def get_config(arg=None):
    return common.build(dataset="flair_hub", task="simclr", arg=arg)
