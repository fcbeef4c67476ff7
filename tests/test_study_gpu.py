"""bench/study_gpu.sh: the GPU machine's study recipe, one call after another. Its example commands
parse; a CPU dry run (tiny preset, TensorFlow unimportable in the run step, as on the GPU machine)
of two calls on fresh machines, the second starting from the records the first brought back."""
import json
import os
import shlex
import shutil
import subprocess
import tarfile

import pytest
from absl import flags

from configs import study_synth
from lcssl.study import __main__ as study_main
from tests._train_helpers import PYTHON, ROOT, cli_env

SCRIPT = str(ROOT / "bench" / "study_gpu.sh")


def _examples() -> list[list[str]]:
    """Every `bench/study_gpu.sh prepare|run ...` command in the script's header and the README."""
    header = open(SCRIPT).read().split("\nset -euo pipefail")[0]
    text = header.replace("\n#", "\n") + "\n" + (ROOT / "README.md").read_text()
    return [shlex.split(line.strip(), comments=True) for line in text.splitlines()
            if line.strip().startswith(("bench/study_gpu.sh prepare ", "bench/study_gpu.sh run "))]


def _parse_study_flags(preset: str, study_flags: list[str]):
    """The study's config after `python -m lcssl.study` parses these flags (raises as it would)."""
    argv = ["lcssl.study", f"--config={ROOT}/configs/study_synth.py:{preset}", "--workdir=/tmp/x", *study_flags]
    values = flags.FlagValues()
    study_main.define_flags(values, sys_argv=argv)
    assert values(argv) == argv[:1], f"not flags of the study: {values(argv)[1:]}"  # main refuses them
    return values.config


def test_every_example_command_parses():
    examples = _examples()
    assert {argv[1] for argv in examples} == {"prepare", "run"}
    for argv in examples:
        if argv[1] == "prepare":  # prepare CARRY [PRESET] [--wheels]
            assert len(argv) <= 5 and argv[4:] in ([], ["--wheels"]), argv
            study_synth.get_config(argv[3] if len(argv) > 3 else None)
        else:  # run CARRY OUT [PRESET] [STUDY FLAGS...]
            _parse_study_flags(argv[4], argv[5:])
    config = _parse_study_flags("gpu", ["--config.seeds=(1,)", "--config.input=native", "--budget_s=60"])
    assert (config.seeds, config.input) == ((1,), "native")
    # A list field cannot be overridden on the command line: an arm's flags live in the config file.
    with pytest.raises(Exception, match="field config.run_overrides is not supported for overriding"):
        _parse_study_flags("gpu", ["--config.run_overrides=('--config.input=native',)"])


@pytest.mark.slow
def test_prepare_on_cpu_then_two_calls_the_second_starting_from_the_first_records(tmp_path):
    carry = tmp_path / "carry"
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
    run_env = dict(env, PYTHONPATH=f"{hide}{os.pathsep}{ROOT}", PARALLEL="1", BUDGET_S="1200")

    def call(n, arms, records_in):
        """One call on a fresh machine: its own WORKDIR and OUT, the records carried in."""
        out = tmp_path / f"out{n}"
        run = subprocess.run([SCRIPT, "run", str(carry), str(out), "tiny", f"--config.only_arms={arms}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=1500,
                             env=dict(run_env, WORKDIR=str(tmp_path / f"work{n}"), RECORDS_IN=records_in))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return out, (out / "study.log").read_text()

    out, log = call(1, "scratch_utt", "")
    assert (out / "status.txt").read_text().startswith("exit 0 after ")
    assert f"--config.data.data_dir={tmp_path / 'work1'}/data" in log
    # TensorFlow is absent: the study says once that it reads with the native reader, and the record says so.
    assert log.count("TensorFlow is not installed: reading the shards with the native reader") == 1
    assert "Study: 1 runs (0 already finished)" in log and "input=native" in log
    first = sorted(p.relative_to(out / "study_records") for p in (out / "study_records").rglob("*.json"))
    assert [str(p) for p in first] == ["protocol4/scratch_utt/seed0_frac0.5.json"]
    record = json.loads((out / "study_records" / first[0]).read_text())
    assert (record["input"], record["device"]) == ("native", "1 x cpu")

    committed = tmp_path / "committed"  # what a user copies into docs/study_records and commits
    shutil.copytree(out / "study_records", committed)
    out, log = call(2, "scratch_utt,simclr_seed", str(committed))
    assert "Study: 3 runs (1 already finished)" in log  # scratch_utt's record came in: not run again
    assert not (tmp_path / "work2" / "runs" / "scratch_utt").exists()
    new = sorted(str(p.relative_to(out / "study_records")) for p in (out / "study_records").rglob("*.json"))
    assert new == ["protocol4/simclr_seed/seed0_frac0.5.json", "protocol4/simclr_seed/seed0_pretrain.json"]
    assert (out / "status.txt").read_text().startswith("exit 0 after ") and "2 new records" in (
        out / "status.txt").read_text()
    saved = json.loads((out / "results_label_efficiency.json").read_text())
    assert {r["arm"] for r in saved["runs"] if r["status"] == "done"} == {"scratch_utt", "simclr_seed"}
    assert (out / "RESULTS.md").is_file() and (out / "gpu.txt").is_file()
