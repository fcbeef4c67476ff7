"""bench/study_gpu.sh: the GPU machine's one-call study recipe, dry-run on the CPU with the tiny
preset and TensorFlow unimportable in the run step (as on the GPU machine)."""
import json
import os
import subprocess
import tarfile

import pytest

from tests._train_helpers import PYTHON, ROOT, cli_env

SCRIPT = str(ROOT / "bench" / "study_gpu.sh")


@pytest.mark.slow
def test_prepare_on_cpu_then_run_without_tensorflow(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    env = dict(cli_env(devices=1), PYTHON=PYTHON)  # the script's python: this test's, wherever it runs
    prep = subprocess.run([SCRIPT, "prepare", str(carry), "tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(env, BUILD_DIR=str(tmp_path / "build")))
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert sorted(p.name for p in carry.iterdir()) == ["data.tar.xz"] and "MiB in" in prep.stdout
    with tarfile.open(carry / "data.tar.xz") as tar:
        names = sorted(tar.getnames())
        card = json.load(tar.extractfile("data/dataset_card.json"))
    shards = [f for split in card["splits"].values() for f in split["files"]]
    # Only what training reads travels: card, plan, shards and their record indexes.
    assert names == sorted(["data", *(f"data/{n}" for n in ["dataset_card.json", "build_plan.json", *shards,
                                                            *(f + ".index.npz" for f in shards)])])

    hide = tmp_path / "hide"  # `import tensorflow` raises in the study and in every run it starts
    for name in ("tensorflow", "tensorflow_datasets"):
        (hide / name).mkdir(parents=True)
        (hide / name / "__init__.py").write_text("raise ImportError('hidden: the GPU machine has none')\n")
    run_env = dict(env, PYTHONPATH=f"{hide}{os.pathsep}{ROOT}", PARALLEL="1", BUDGET_S="1200",
                   WORKDIR=str(tmp_path / "work"))
    arms = "scratch_utt,simclr_seed"
    run = subprocess.run([SCRIPT, "run", str(carry), str(out), "tiny", f"--config.only_arms={arms}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500, env=run_env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "status.txt").read_text().startswith("exit 0 after ")
    records = sorted((out / "study_records").rglob("*.json"))
    assert len(records) == 3  # simclr_seed's pre-training, its fine-tuning, scratch_utt
    saved = json.loads((out / "results_label_efficiency.json").read_text())
    assert {r["arm"] for r in saved["runs"] if r["status"] == "done"} == set(arms.split(","))
    assert (out / "RESULTS.md").is_file() and (out / "gpu.txt").is_file()
    log = (out / "study.log").read_text()
    assert f"--config.data.data_dir={tmp_path / 'work'}/data" in log
