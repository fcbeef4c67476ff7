"""predict_split: per-patch maps of a split built by `python -m data_prep build`, for inspection
and for the report's sample panels. TensorFlow is imported here only (lcssl.data.pipeline's tf.data
reader; the native reader needs none)."""
from __future__ import annotations

import io
import os

from absl import logging
import numpy as np

from lcssl.errors import UserError
from lcssl.predict.model import global_batch_size, load_model, normalize
from lcssl.predict.sinks import NODATA, PatchMaps


def _sample(host: dict, i: int, spec: dict) -> dict:
    """What a report panel shows of patch i: aerial RGB [H, W, 3] uint8, and the mean NDVI of the
    series crop per valid date (with the encoded dates), when the bands are there."""
    aerial_bands, sits_bands = list(spec["aerial"]["bands"]), list(spec["sits"]["bands"])
    rgb = [aerial_bands.index(b) for b in ("R", "G", "B") if b in aerial_bands]
    out = {"rgb": host["aerial"][i][..., rgb if len(rgb) == 3 else [0, 1, 2]].astype(np.uint8)}
    if "B04" in sits_bands and "B08" in sits_bands:
        valid = host["sits_valid"][i].astype(bool)
        red = host["sits"][i][valid][..., sits_bands.index("B04")].astype(np.float64)
        nir = host["sits"][i][valid][..., sits_bands.index("B08")].astype(np.float64)
        out["ndvi"] = ((nir - red) / np.maximum(nir + red, 1e-6)).mean(axis=(1, 2)).astype(np.float32)
        out["dates"] = host["dates"][i][valid].astype(np.int32)
        out["date_encoding"] = np.asarray(spec["sits"]["date_encoding"])
    return out


def predict_split(checkpoint: str | tuple, data_dir: str, split: str, out_dir: str, *,
                  batch_size: int | None = None, samples: int = 8, progress: bool = True,
                  mesh=None, reader: str = "tfdata") -> dict:
    """Per-patch maps of a split built by `python -m data_prep build`, for inspection.

    Writes OUT/<split>_<index>.tif per example (the split's fixed eval order; sinks.PatchMaps:
    band 1 the predicted class, band 2 the label), OUT/<split>.qml, and OUT/summary.json with each
    patch's pixel accuracy and the split's scores; for the first `samples` patches also
    OUT/<split>_<index>_sample.npz (aerial RGB, NDVI over time) for `lcssl.report --maps=OUT`.
    `reader`: 'tfdata' | 'native' (lcssl.data.pipeline.choose_reader), the same patches and order.
    """
    import jax
    from tqdm import tqdm

    from lcssl import checkpoint as ckpt_lib
    from lcssl import files, metrics, sharding
    from lcssl.data import normalize as normalize_lib
    from lcssl.data import pipeline

    mesh = mesh or sharding.make_mesh()
    batch_size = global_batch_size(batch_size, mesh)
    try:
        card = pipeline.load_card(data_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--records={data_dir}: {e}") from None
    if split not in card.get("splits", {}):
        raise UserError(f"--split={split}: not in {data_dir} (splits: {sorted(card['splits'])})")
    logits_fn, spec, class_names = (load_model(checkpoint, mesh) if isinstance(checkpoint, str)
                                    else checkpoint)
    try:
        ckpt_lib.check_input_spec(spec, card, source=str(checkpoint)[:200], target=data_dir)
    except ValueError as e:
        raise UserError(str(e).split("\nRebuild")[0]) from None
    if list(card["classes"]) != list(class_names):
        raise UserError(f"--records={data_dir}: the checkpoint predicts the classes "
                        f"{class_names}, the dataset has {card['classes']}")
    stats = normalize_lib.stats_from_card(spec)
    os.makedirs(out_dir, exist_ok=True)
    maps = PatchMaps(out_dir, split, class_names)
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    patches, index = [], 0
    total = card["splits"][split]["num_examples"]
    with tqdm(total=total, unit="patch", disable=not progress, desc=f"predict {split}") as bar:
        for host in pipeline.make_eval_iterator(data_dir, split, global_batch_size=batch_size,
                                                reader=reader):
            valid = host.pop("example_valid")
            label = host.pop("label")
            batch = sharding.host_batch_to_global(host, mesh)
            pred = np.asarray(jax.numpy.argmax(logits_fn(normalize(batch, stats)), -1))
            for i in np.flatnonzero(valid):
                p, y = pred[i].astype(np.uint8), label[i].astype(np.uint8)
                labelled = y != NODATA
                np.add.at(confusion, (y[labelled], p[labelled]), 1)
                name = maps.write(index, p, y)
                patches.append({"file": name, "labelled_px": int(labelled.sum()),
                                "accuracy": float((p == y)[labelled].mean()) if labelled.any()
                                else None})
                if index < samples:
                    buffer = io.BytesIO()
                    np.savez_compressed(buffer, **_sample(host, i, spec))
                    patches[-1]["sample"] = name[:-4] + "_sample.npz"
                    files.atomic_write_bytes(os.path.join(out_dir, patches[-1]["sample"]),
                                             buffer.getvalue())
                index += 1
            bar.update(int(valid.sum()))
    maps.finish()
    scores = metrics.scores_from_confusion(confusion, class_names)
    scores["confusion_matrix"] = confusion.tolist()
    summary = {"split": split, "data_dir": os.path.abspath(data_dir), "num_patches": index,
               "scores": scores, "patches": patches}
    files.write_json(os.path.join(out_dir, "summary.json"), summary)
    logging.info("Wrote %d per-patch maps of %s/%s to %s (mIoU %s)", index, data_dir, split, out_dir,
                 scores.get("miou"))
    return summary
