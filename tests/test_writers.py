"""lcssl.writers: TensorBoard event files without TensorFlow, behind clu's MetricWriter interface,
read back by lcssl.report like TensorFlow's."""
import subprocess
import sys

import numpy as np
import pytest

from lcssl import report, writers
from tests._train_helpers import ROOT, cli_env


def test_event_writer_scalars_read_back_like_tensorflows(tmp_path):
    w = writers.EventWriter(str(tmp_path / "native"))
    w.write_scalars(1, {"train/loss": 2.5, "train/steps": np.int32(7)})
    w.write_scalars(3, {"train/loss": np.float32(1.25)})
    w.write_texts(3, {"note": "hello"})
    w.write_histograms(3, {"w": np.arange(10.0)}, num_buckets={"w": 4})
    w.write_hparams({"lr": 0.1, "opt": "sgd"})
    w.write_summaries(3, {"raw": np.ones((2, 2), np.float32)})
    with pytest.raises(NotImplementedError, match="images"):
        w.write_images(3, {"img": np.zeros((2, 2, 3), np.uint8)})
    w.close()
    assert report.read_scalars(str(tmp_path / "native")) == {"train/loss": [(1, 2.5), (3, 1.25)],
                                                              "train/steps": [(1, 7.0)]}

    from clu import metric_writers  # TensorFlow's writer, where TensorFlow is installed

    tf_writer = metric_writers.SummaryWriter(str(tmp_path / "tf"))
    tf_writer.write_scalars(1, {"train/loss": 2.5, "train/steps": np.int32(7)})
    tf_writer.write_scalars(3, {"train/loss": np.float32(1.25)})
    tf_writer.close()
    assert report.read_scalars(str(tmp_path / "tf")) == report.read_scalars(str(tmp_path / "native"))


PROGRAM = """
import sys
sys.modules['tensorflow'] = None
from lcssl import writers
from clu import metric_writers, periodic_actions
w = metric_writers.create_default_writer(sys.argv[1], asynchronous=False)
assert metric_writers.SummaryWriter is writers.EventWriter
w.write_scalars(5, {'loss': 0.5})
w.close()
print('written')
"""


def test_clus_default_writer_writes_event_files_without_tensorflow(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path)], cwd=ROOT, env=cli_env(devices=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "written" in proc.stdout, proc.stderr[-3000:]
    assert report.read_scalars(str(tmp_path)) == {"loss": [(5, 0.5)]}
