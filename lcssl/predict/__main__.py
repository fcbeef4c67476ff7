"""python -m lcssl.predict: a map of a mosaic (--aerial), or per-patch maps of a split (--records).

User errors (a flag, an input or a checkpoint that does not fit) are one `error:` line and exit 2
(lcssl.cli.user_errors); the inputs are checked before the checkpoint is restored.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lcssl import cli
from lcssl.data import pipeline
from lcssl.errors import UserError
from lcssl.predict import mosaic, sinks
from lcssl.predict.model import TTA_VIEWS
from lcssl.predict.split import predict_split


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lcssl.predict", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python -m lcssl.predict --checkpoint=runs/ft --aerial=mosaic.tif "
               "--sits=s2/ --out=map.tif --confidence")
    p.add_argument("--checkpoint", required=True,
                   help="run workdir (its best/ checkpoint if any, else the latest of checkpoints/) "
                        "or a checkpoints folder")
    p.add_argument("--aerial", help="aerial mosaic, GeoTIFF or VRT, uint8 bands")
    p.add_argument("--sits", help="Sentinel-2: a folder of one GeoTIFF per date (YYYYMMDD in the "
                                  "name; '*mask*' files: cloud/snow probability, for any subset "
                                  "of the dates) or one GeoTIFF with band descriptions "
                                  "'YYYYMMDD_<band>'; any CRS")
    p.add_argument("--out", required=True, help="class map to write (COG GeoTIFF, uint8); a .qml "
                                                "QGIS style is written beside it. With --records: "
                                                "the folder for the per-patch maps")
    p.add_argument("--records", help="instead of a mosaic: a dataset folder from `python -m "
                                     "data_prep build`; writes one map per patch of --split")
    p.add_argument("--split", default="test", help="with --records: the split (default test)")
    p.add_argument("--input", choices=pipeline.READERS, default=pipeline.DEFAULT_READER,
                   help="with --records: the reader of the shards, tf.data or the native reader (no "
                        "TensorFlow; chosen by itself where TensorFlow is not installed); both give "
                        "the same patches in the same order (default %(default)s)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="window overlap as a fraction of the window (0.5: smoothest, 4x the "
                        "windows of 0; default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per step over all devices, a multiple of the device count "
                        "(default 4 per device)")
    p.add_argument("--block-width", type=int, default=mosaic.DEFAULT_BLOCK_WIDTH,
                   help="mosaic columns processed at once: memory grows with it, not with the "
                        "mosaic (default %(default)s)")
    for sink in sinks.OPTIONAL:
        p.add_argument(f"--{sink.name}", action="store_true", help=sink.help)
    p.add_argument("--tta", choices=sorted(TTA_VIEWS), default="none",
                   help="test-time augmentation, logits averaged over flips (4 views) or flips "
                        "and 90 degree rotations (d4: 8 views); costs one forward pass per view "
                        "(default %(default)s)")
    p.add_argument("--without-sits", choices=mosaic.WITHOUT_SITS, default="auto",
                   help="windows without a usable Sentinel-2 series: 'auto' predicts them from "
                        "the aerial image alone when the model was trained with modality dropout "
                        "(flagged in <out>_aerial_only.tif), else they are nodata; 'nodata' "
                        "always leaves them nodata (default %(default)s)")
    p.add_argument("--min-clear-fraction", type=float, default=1.0,
                   help="a Sentinel-2 date counts for a window when at least this fraction of "
                        "its crop has data; the rest is filled with the date's mean (default "
                        "%(default)s: all of it)")
    p.add_argument("--aerial-bands", help="mosaic band numbers (1-based) in the checkpoint's band "
                                          "order, e.g. 3,2,1,4,5")
    p.add_argument("--sits-bands", help="Sentinel-2 band numbers (1-based, per-date files) in the "
                                        "checkpoint's band order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli.user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lcssl.files import refuse_remote

    for name in ("checkpoint", "aerial", "sits", "out", "records"):
        refuse_remote(getattr(args, name), f"--{name}")
    cli.start_logging()   # lcssl's INFO lines; Orbax's per-restore ones are filtered out
    if bool(args.aerial) == bool(args.records):
        raise UserError("give either --aerial (a mosaic) or --records (a prepared dataset)")
    if args.records:
        summary = predict_split(args.checkpoint, args.records, args.split, args.out,
                                batch_size=args.batch_size, progress=not args.no_progress,
                                reader=args.input)
        print(f"wrote {summary['num_patches']} maps and summary.json to {args.out}")
        return 0
    summary = mosaic.predict_mosaic(
        args.checkpoint, args.aerial, args.sits, args.out, overlap=args.overlap,
        batch_size=args.batch_size, block_width=args.block_width, aerial_bands=args.aerial_bands,
        sits_bands=args.sits_bands, tta=args.tta, without_sits=args.without_sits,
        min_clear_fraction=args.min_clear_fraction, progress=not args.no_progress,
        **{s.name: getattr(args, s.name) for s in sinks.OPTIONAL})
    print(f"wrote {', '.join(summary['out'].values())} and {summary['qml']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
