"""Fine-tune a SimCLR-pre-trained encoder for FLAIR-HUB segmentation (new decoder and heads).

    python -m lcssl.main --config=configs/finetune_flair_hub.py --workdir=runs/finetune_flair_hub \
        --config.supervised.init_from=runs/ssl_flair_hub
    python -m lcssl.main --config=configs/finetune_flair_hub.py --workdir=runs/ft_hub_from_flair2 \
        --config.supervised.init_from=runs/ssl_flair2 \
        --config.supervised.adapt_bands=True                  # FLAIR #2's 5 bands -> RGBI

Presets: default (SGD + momentum, warm-up + cosine, batch 64, 10 epochs); tiny. Few labels:
--config.label_fraction=0.1.
"""
from lcssl import configs as common


def _finetune(c):
    c.supervised.init_from = "runs/ssl_flair_hub"
    c.num_epochs = 10


def get_config(arg=None):
    return common.build(dataset="flair_hub", task="supervised", arg=arg, modify=_finetune)
