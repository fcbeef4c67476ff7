"""Command line of data_prep.

    python -m data_prep synth --layout=flair2 --out=/tmp/flair2_raw --patch-size=64
    python -m data_prep build --layout=flair2 --src=/tmp/flair2_raw --out=/tmp/flair2_tfr --expect-size=64
    python -m data_prep synth --layout=flair_hub --out=/tmp/hub_raw --patch-size=64     # layouts: data_prep/layouts.py
    python -m data_prep verify /tmp/flair2_tfr      # the card's checksum; every shard's records, CRCs, size, sha256
    python -m data_prep build --help
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lcssl.errors import UserError


def _synth(args) -> int:
    from data_prep import synth

    kwargs = dict(layout=args.layout, num_zones=args.num_zones, patches_per_zone=args.patches_per_zone,
                  patch_size=args.patch_size, sits_size=args.sits_size, num_dates=args.num_dates, seed=args.seed)
    if args.unlabelled_per_zone is not None:
        kwargs["unlabelled_per_zone"] = args.unlabelled_per_zone
    if args.every_class is not None:
        kwargs["every_class"] = args.every_class
    if args.test_zones:
        kwargs["test_zones"] = args.test_zones
    try:
        kwargs["realism"] = synth.Realism(
            boundary_jitter_px=args.boundary_jitter_px, wrong_region_share=args.wrong_region_share,
            zone_gain=args.zone_gain, zone_offset=args.zone_offset, date_gain=args.date_gain,
            phenology_shift_days=args.phenology_shift_days)
        info = synth.write_dataset(args.out, **kwargs)
    except ValueError as e:  # a flag value out of range: printed by lcssl.cli
        raise UserError(f"python -m data_prep synth: {e}") from None
    print(json.dumps(info, indent=2, default=str))
    from data_prep import layouts

    sits_size = min(args.sits_size, layouts.get(args.layout).sits_size)
    print(f"build it with: python -m data_prep build --layout={args.layout} --src={args.out} --out=OUT "
          f"--expect-size={args.patch_size} --sits-size={sits_size}")
    return 0


def _build(args) -> int:
    from data_prep import build

    sits = dict(max_cloud=args.max_cloud, min_clear_dates=args.min_clear_dates, monthly=args.monthly,
                max_dates=args.max_dates, date_encoding=args.date_encoding)
    options = build.BuildOptions(
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        shard_size=args.shard_size, workers=args.workers, strict=args.strict,
        unlabelled_includes_train=args.unlabelled_includes_train,
        unlabelled_from_eval_zones=args.unlabelled_from_eval_zones, sits_size=args.sits_size,
        expect_size=args.expect_size, cloud_prob_threshold=args.cloud_prob_threshold, sits=sits,
        tfds_metadata=not args.no_tfds_metadata, progress=not args.no_progress)
    # SourceError / BuildError (UserErrors) reach lcssl.cli: "error: <file>: ...", exit 2.
    build.build(args.src, args.out, layout=args.layout, options=options)
    return 0


def _verify(args) -> int:
    from data_prep import build
    from lcssl.data.schema import CARD_NAME

    try:
        checked, problems = build.verify(args.data_dir)
    except (FileNotFoundError, ValueError) as e:  # no card, unreadable card, unknown format version
        raise UserError(f"verify: {e}") from None
    for path, problem in problems:
        print(f"{path}: {problem}")
    # A shard found intact whose count the card misstates blames the card, not the shard.
    damaged = len({path for path, problem in problems
                   if not path.endswith(CARD_NAME) and not problem.startswith("intact")})
    if problems:
        card_edited = damaged < len(problems)
        what = (f"{damaged} of {checked} shards damaged in {args.data_dir}"
                + (f", and its {CARD_NAME} was edited" if card_edited else "") if damaged
                else f"its {CARD_NAME} was edited (the shards are intact)")
        print(f"verify: {what}; re-run the `python -m data_prep build` command that made it to "
              f"rewrite {'them' if damaged else 'the card'}", file=sys.stderr)
        return 1
    print(f"verify: {CARD_NAME} and all {checked} shards in {args.data_dir} match (checksum, records and "
          "their CRCs, bytes, sha256)")
    return 0


def parser() -> argparse.ArgumentParser:
    from data_prep import layouts

    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    s = sub.add_parser("synth", help="write a tiny synthetic raw dataset in a layout's folder structure",
                       formatter_class=fmt)
    s.add_argument("--layout", choices=layouts.NAMES, required=True)
    s.add_argument("--out", required=True, help="output folder of the raw dataset")
    s.add_argument("--num-zones", type=int, default=4)
    s.add_argument("--patches-per-zone", type=int, default=6, help="labelled patches per zone")
    s.add_argument("--unlabelled-per-zone", type=int, default=None, help="default: synth's own")
    s.add_argument("--patch-size", type=int, default=64, help="aerial px (footprint stays 102.4 m)")
    s.add_argument("--sits-size", type=int, default=40, help="Sentinel-2 crop px (flair_hub: its files are 10 px)")
    s.add_argument("--num-dates", type=int, default=12, help="Sentinel-2 acquisitions per series")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--every-class", action=argparse.BooleanOptionalAction, default=None,
                   help="small plots of every class of the layout in every zone (default: the layout's; "
                        "flair2, flair_hub: on; hameln: off, its output unchanged)")
    s.add_argument("--test-zones", type=int, default=0,
                   help="the last N zones go to the layout's released test folders (flair2)")
    g = s.add_argument_group("realism (data_prep.synth.Realism; all off by default: same bytes as without)")
    g.add_argument("--boundary-jitter-px", type=int, default=0,
                   help="label noise: label boundaries move by up to this many px (smooth random field)")
    g.add_argument("--wrong-region-share", type=float, default=0.0,
                   help="label noise: share of connected land-cover regions given another region class")
    g.add_argument("--zone-gain", type=float, default=0.0,
                   help="domain shift: per-zone radiometric gain uniform in [1-x, 1+x] (aerial and S2)")
    g.add_argument("--zone-offset", type=float, default=0.0,
                   help="domain shift: per-zone offset uniform in [-x, x] x full scale (255; S2 10000)")
    g.add_argument("--date-gain", type=float, default=0.0,
                   help="domain shift: per-acquisition Sentinel-2 gain uniform in [1-x, 1+x]")
    g.add_argument("--phenology-shift-days", type=float, default=0.0,
                   help="domain shift: per-region (zone pair) phenology shift uniform in [-x, x] days")
    s.set_defaults(fn=_synth)

    b = sub.add_parser("build", help="raw patches -> sharded TFRecords + dataset_card.json", formatter_class=fmt,
                       description="Validates every patch (bad ones are reported and skipped, or stop the "
                                   "build with --strict), splits by zone, writes <split>-NNNNN-of-MMMMM.tfrecord "
                                   "shards, dataset_card.json and build_summary.json. Re-running resumes.")
    b.add_argument("--layout", choices=layouts.NAMES, required=True)
    b.add_argument("--src", required=True, help="root of the raw dataset")
    b.add_argument("--out", required=True, help="output folder (shards, card, summary)")
    g = b.add_argument_group("splits")
    g.add_argument("--val-fraction", type=float, default=0.15, help="fraction of labelled zones for val")
    g.add_argument("--test-fraction", type=float, default=0.15, help="fraction of labelled zones for test")
    g.add_argument("--seed", type=int, default=0, help="zone split and shard assignment")
    g.add_argument("--unlabelled-includes-train", action="store_true",
                   help="also put the train patches (labels dropped) into the unlabelled split")
    g.add_argument("--unlabelled-from-eval-zones", action="store_true",
                   help="also pre-train on unlabelled patches of val/test zones (default: kept out, no leakage)")
    g = b.add_argument_group("patches")
    g.add_argument("--expect-size", type=int, default=None,
                   help="aerial height = width in px (default: the layout's, 512 for FLAIR #2; synthetic: 64)")
    g.add_argument("--sits-size", type=int, default=None,
                   help="Sentinel-2 crop px around the patch centre (default: the layout's; flair2, hameln: 40, "
                        "flair_hub: 8 of its 10 px files)")
    g = b.add_argument_group("Sentinel-2 series (lcssl.data.sits.SitsOptions)")
    g.add_argument("--max-cloud", type=float, default=0.5, help="drop dates with a cloud/snow score above this")
    g.add_argument("--cloud-prob-threshold", type=float, default=None,
                   help="score = fraction of pixels with cloud/snow prob >= this (default: mean probability)")
    g.add_argument("--min-clear-dates", type=int, default=2, help="fewer clear dates: skip as too_few_dates")
    g.add_argument("--monthly", action="store_true", help="average the clear dates of each month")
    g.add_argument("--max-dates", type=int, default=12, help="series length T (padded / evenly subsampled)")
    g.add_argument("--date-encoding", default="doy", help="'doy' or 'days_since:YYYY-MM-DD'")
    g = b.add_argument_group("output")
    g.add_argument("--shard-size", type=int, default=64, help="examples per shard (64 x 512 px ~ 130 MB)")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    g.add_argument("--strict", action="store_true", help="stop at the first bad patch")
    g.add_argument("--no-tfds-metadata", action="store_true",
                   help="skip dataset_info.json / features.json (tfds.builder_from_directory)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=_build)

    v = sub.add_parser("verify", help="check the dataset card (its checksum) and every shard against it (records "
                                      "and their CRCs, bytes, sha256)",
                       formatter_class=fmt)
    v.add_argument("data_dir", help="folder written by `build` (dataset_card.json and the shards)")
    v.set_defaults(fn=_verify)
    return p


def main(argv=None) -> int:
    from lcssl import cli

    cli.quiet_native_logs()  # before TensorFlow loads, here and in the build's worker processes
    from lcssl.files import refuse_remote

    args = parser().parse_args(argv)
    for name, flag in (("src", "--src"), ("out", "--out"), ("data_dir", "data_dir")):
        refuse_remote(getattr(args, name, None), flag)
    return args.fn(args)


if __name__ == "__main__":
    from lcssl import cli

    sys.exit(cli.user_errors(main)())
