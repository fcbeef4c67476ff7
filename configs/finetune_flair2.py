"""Fine-tune a SimCLR-pre-trained encoder for FLAIR #2 segmentation (new decoder and heads).

    python -m lcssl.main --config=configs/finetune_flair2.py --workdir=runs/finetune_flair2 \
        --config.supervised.init_from=runs/ssl_flair2
    python -m lcssl.main --config=configs/finetune_flair2.py:ssl1 --workdir=runs/ssl1_finetune_flair2 \
        --config.supervised.init_from=runs/ssl1_flair2                # seminar SSL1
    python -m lcssl.main --config=configs/finetune_flair2.py --workdir=runs/probe_flair2 \
        --config.supervised.init_from=runs/ssl_flair2 \
        --config.supervised.finetune_mode=linear                        # frozen encoder

Presets: default (SGD + momentum, warm-up + cosine, batch 64); ssl1 (5 epochs, batch 16, SGD lr 0.001);
tiny. The encoder's input spec (bands, date encoding, resolution) must match this dataset's card.
"""
from lcssl import configs as common

PRESETS = {"ssl1": common.seed_setup(epochs=5, batch_size=16)}


def _finetune(c):
    c.supervised.init_from = "runs/ssl_flair2"
    c.num_epochs = 10


def get_config(arg=None):
    return common.build(dataset="flair2", task="supervised", arg=arg, presets=PRESETS,
                        modify=_finetune)
