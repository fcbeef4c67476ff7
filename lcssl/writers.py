"""Metric writers behind clu's MetricWriter interface, with or without TensorFlow.

clu's default writer (log lines + TensorBoard summaries) writes its summaries with TensorFlow, and
its package `clu.metric_writers` imports TensorFlow when it is imported (so does
`clu.periodic_actions`, which imports that package). Where TensorFlow is absent, importing this
module puts `EventWriter` in the place of clu's SummaryWriter *before* that package is first imported:
the package and periodic_actions then import, and `create_default_writer` writes the same kind of
event files (`events.out.tfevents.*`, tensor summaries with the scalar plugin's metadata, as
`tf.summary.scalar` writes them) through the `tensorboard` package's own event file writer.
TensorBoard and `lcssl.report.read_scalars` read both alike. Where TensorFlow is installed, clu's
writer is kept.
"""
from __future__ import annotations

import os
import sys
import time
import types
from typing import Any, Mapping, Optional

import numpy as np


def _tensorflow_missing() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return True
    return False


_STUB = None
if "clu.metric_writers" not in sys.modules and _tensorflow_missing():
    _STUB = types.ModuleType("clu.metric_writers.summary_writer")
    _STUB.SummaryWriter = None  # replaced by EventWriter below, before anything can use it
    sys.modules[_STUB.__name__] = _STUB

from clu import metric_writers  # noqa: E402
from clu.metric_writers import interface  # noqa: E402


class EventWriter(interface.MetricWriter):
    """TensorBoard event files written by the `tensorboard` package (no TensorFlow).

    Scalars, texts, histograms, hparams and raw tensor summaries; images, videos and audio need an
    encoder this module does not carry and raise NotImplementedError (lcssl writes none).
    """

    def __init__(self, logdir: str):
        super().__init__()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self._writer = EventFileWriter(os.fspath(logdir))

    def _add(self, step: int, summary) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, interface.Scalar]):
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        for key, value in scalars.items():
            self._add(step, scalar_pb(key, np.asarray(value)))

    def write_texts(self, step: int, texts: Mapping[str, str]):
        from tensorboard.plugins.text.summary_v2 import text_pb

        for key, value in texts.items():
            self._add(step, text_pb(key, value))

    def write_histograms(self, step: int, arrays: Mapping[str, interface.Array],
                         num_buckets: Optional[Mapping[str, int]] = None):
        from tensorboard.plugins.histogram.summary_v2 import histogram_pb

        for key, value in arrays.items():
            buckets = None if num_buckets is None else num_buckets.get(key)
            self._add(step, histogram_pb(key, np.asarray(value), buckets=buckets))

    def write_hparams(self, hparams: Mapping[str, Any]):
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        self._add(0, hparams_pb(dict(hparams)))

    def write_summaries(self, step: int, values: Mapping[str, interface.Array],
                        metadata: Optional[Mapping[str, Any]] = None):
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.util import tensor_util

        for key, value in values.items():
            md = metadata.get(key) if metadata is not None else None
            if isinstance(md, bytes):
                md = summary_pb2.SummaryMetadata.FromString(md)
            summary = summary_pb2.Summary()
            summary.value.add(tag=key, metadata=md or summary_pb2.SummaryMetadata(),
                              tensor=tensor_util.make_tensor_proto(np.asarray(value)))
            self._add(step, summary)

    def _unsupported(self, what: str):
        raise NotImplementedError(f"EventWriter does not write {what} (no encoder without TensorFlow)")

    def write_images(self, step: int, images: Mapping[str, interface.Array]):
        self._unsupported("images")

    def write_videos(self, step: int, videos: Mapping[str, interface.Array]):
        self._unsupported("videos")

    def write_audios(self, step: int, audios: Mapping[str, interface.Array], *, sample_rate: int):
        self._unsupported("audio")

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


if _STUB is not None:
    from clu.metric_writers import utils as _clu_utils

    _STUB.SummaryWriter = metric_writers.SummaryWriter = _clu_utils.SummaryWriter = EventWriter


def create_default_writer(logdir: str, *, just_logging: bool = False) -> interface.MetricWriter:
    """clu's default writer: log lines, and (unless just_logging) TensorBoard event files in
    `logdir`, by TensorFlow where installed, else by EventWriter."""
    return metric_writers.create_default_writer(logdir, just_logging=just_logging)
