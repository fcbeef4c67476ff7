"""Fine-tune a SimCLR-pre-trained encoder for Hameln segmentation (new decoder and heads).

    python -m lcssl.main --config=configs/finetune_hameln.py --workdir=runs/finetune_hameln \
        --config.supervised.init_from=runs/ssl_hameln
    python -m lcssl.main --config=configs/finetune_hameln.py:ssl2 --workdir=runs/ssl2_finetune_hameln \
        --config.supervised.init_from=runs/ssl2_hameln                 # seminar SSL2
    python -m lcssl.main --config=configs/finetune_hameln.py:ssl3 --workdir=runs/ssl3_finetune_hameln \
        --config.supervised.init_from=runs/ssl3_hameln                 # seminar SSL3

Presets: default (SGD + momentum, warm-up + cosine, batch 64); ssl2 (20 epochs, batch 16, SGD lr
0.001); ssl3 (20 epochs, batch 8); tiny. Few labels: --config.label_fraction=0.1.
"""
from lcssl import configs as common

PRESETS = {
    "ssl2": common.seed_setup(epochs=20, batch_size=16),
    "ssl3": common.seed_setup(epochs=20, batch_size=8),
}


def _finetune(c):
    c.supervised.init_from = "runs/ssl_hameln"
    c.num_epochs = 50


def get_config(arg=None):
    return common.build(dataset="hameln", task="supervised", arg=arg, presets=PRESETS,
                        modify=_finetune)
