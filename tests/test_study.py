"""The label-efficiency study: its plan, the arms the trainer cannot run, the report, and the real command."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import study_synth
from lcssl import study
from lcssl.study import report as study_report
from lcssl.study import run as study_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _record(arm, seed, fraction, miou, oa, iou):
    return {"arm": arm, "seed": seed, "label_fraction": fraction, "status": "done", "test_miou": miou,
            "test_oa": oa, "val_miou": miou, "best_step": 10, "class_names": ["a", "b", "c"], "test_iou": iou,
            "seconds": 1.0, "workdir": f"/runs/{arm}/{seed}"}


def test_report_on_hand_made_results(tmp_path):
    # from scratch mIoU 30, 35, 40, 45, 50 and SimCLR 35, 42, 40, 49, 54 (seeds 0-4) at 10% labels:
    # scratch mean 40, std (ddof=1) sqrt(62.5) = 7.9; paired differences 5, 7, 0, 4, 4 -> mean 4,
    # std sqrt(6.5) = 2.550, 95% interval 4 -+ t(0.975, 4) 2.776 x 2.550 / sqrt(5) = [0.8, 7.2].
    scratch, simclr = [0.30, 0.35, 0.40, 0.45, 0.50], [0.35, 0.42, 0.40, 0.49, 0.54]
    records = [_record("scratch_utt", s, 0.1, m, 0.8, [0.2, None, 0.4]) for s, m in enumerate(scratch)]
    records += [_record("simclr", s, 0.1, m, 0.9, [0.3, None, 0.6]) for s, m in enumerate(simclr)]
    records += [_record("scratch_utt", 0, 1.0, 0.6, 0.9, [0.5, 0.5, 0.5])]
    records += [{"arm": "simclr", "seed": 0, "label_fraction": 1.0, "status": "failed", "message": "exit code 1",
                 "seconds": 2.0, "workdir": "/runs/x"}]
    summary = study.summarize(records)
    mean, std, n = summary[("scratch_utt", 0.1)]["miou"]
    assert (mean, n) == (pytest.approx(40.0), 5) and std == pytest.approx(np.sqrt(62.5))
    mean, std, n = summary[("simclr", 0.1)]["diff"]
    assert (mean, n) == (pytest.approx(4.0), 5) and std == pytest.approx(np.sqrt(6.5))
    assert summary[("scratch_utt", 1.0)]["miou"][2] == 1 and np.isnan(summary[("scratch_utt", 1.0)]["miou"][1])
    assert study.best_arm(summary, 0.1) == "simclr"

    labels = {"scratch_utt": "from scratch", "simclr": "SimCLR", "vicreg": "VICReg"}
    meta = {"command": "python -m lcssl.study --config=x", "commit": "abc", "machine": "m", "date": "d",
            "wall_seconds_this_invocation": 5.0, "run_seconds_total": 9.0, "workdir": "/runs",
            "label_fractions": [0.1, 1.0], "seeds": [0, 1, 2, 3, 4]}
    out = tmp_path / "docs" / "RESULTS.md"
    content = study.write_results(records, labels, {"vicreg": "no task 'vicreg'"}, meta, out)
    text = out.read_text()
    assert ("| from scratch | 40.0 ± 7.9 | 80.0 ± 0.0 | pending (1 of 5 seeds) | pending (1 of 5 seeds) |"
            in text)                                         # no figure from fewer than 5 seeds
    assert "| SimCLR | +4.0 ± 2.5 [+0.8, +7.2] | - |" in text      # paired difference [95% CI]
    assert "| a | 20.0 | 30.0 | 10.0 |" in text and "| b | - | - | - |" in text   # per class at 10%
    assert "VICReg (`vicreg`): no task 'vicreg'" in text
    assert "simclr seed 0 at 100%: failed, exit code 1" in text
    png = (tmp_path / "docs" / study.PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG")
    saved = json.loads((tmp_path / "docs" / "results_label_efficiency.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(content["runs"])) and len(saved["runs"]) == 12
    csv_rows = (tmp_path / "docs" / "results_label_efficiency.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 12 and csv_rows[0].startswith("arm,kind,seed,label_fraction,status,test_miou")


def test_no_share_of_an_oracle_gain_that_is_not_measurable():
    # from scratch 30-50; SimCLR +4 on every seed; the oracle +2, -2, +1, -1, +1 at 10% (95% interval
    # reaching 0: no share of it) and +12, +10, +11, +12, +10 at 1% (a share: 4 / 11 = 36%).
    scratch = [0.30, 0.35, 0.40, 0.45, 0.50]
    oracle = {0.1: [0.02, -0.02, 0.01, -0.01, 0.01], 0.01: [0.12, 0.10, 0.11, 0.12, 0.10]}
    records = [_record("scratch_utt", s, f, m, 0.8, [m]) for f in oracle for s, m in enumerate(scratch)]
    records += [_record("simclr", s, f, m + 0.04, 0.8, [m]) for f in oracle for s, m in enumerate(scratch)]
    records += [_record("oracle", s, f, m + oracle[f][s], 0.8, [m]) for f in oracle for s, m in enumerate(scratch)]
    summary = study.summarize(records)
    assert summary[("oracle", 0.1)]["ci"][0] < 0 and np.isnan(summary[("simclr", 0.1)]["gap"])
    assert summary[("simclr", 0.01)]["gap"] == pytest.approx(4 / 11)


def test_methods_with_two_seeds_are_screened_seed_by_seed_against_the_oracle(tmp_path):
    # At 1%: from scratch 30 / 34, the oracle 44 / 46 (+14 / +12), VICReg 36 / 35 (+6 / +1),
    # BYOL 31 / 30 (+1 / -4); SimCLR has 5 seeds (a figure, not a screen).
    scores = {"scratch_utt": [0.30, 0.34, 0.32, 0.32, 0.32], "oracle": [0.44, 0.46], "vicreg": [0.36, 0.35],
              "byol": [0.31, 0.30], "simclr": [0.40] * 5}
    records = [_record(arm, s, 0.01, m, 0.8, [m, m, m]) for arm, ms in scores.items() for s, m in enumerate(ms)]
    labels = {"scratch_utt": "from scratch", "oracle": "oracle", "vicreg": "VICReg", "byol": "BYOL",
              "simclr": "SimCLR"}
    meta = {"command": "c", "commit": "abc", "machine": "m", "date": "d", "wall_seconds_this_invocation": 1.0,
            "run_seconds_total": 1.0, "workdir": "/runs", "label_fractions": [0.01], "seeds": [0, 1, 2, 3, 4],
            "pretrained_arms": ["vicreg", "byol", "simclr"]}
    out = tmp_path / "RESULTS.md"
    study.write_results(records, labels, {}, meta, out)
    screen = out.read_text().split("## Screening")[1].split("\n## ")[0]
    rows = [line for line in screen.splitlines() if line.startswith("| 1% |")]
    # best first; share of the oracle's gain over the same seeds: 3.5 / 13 = 27%, -1.5 / 13 = -12%
    assert rows == ["| 1% | VICReg | seed 0: +6.0 / +14.0; seed 1: +1.0 / +12.0 | +3.5 | 27% |",
                    "| 1% | BYOL | seed 0: +1.0 / +14.0; seed 1: -4.0 / +12.0 | -1.5 | -12% |"]


def test_plan_pretrains_once_per_arm_and_seed_and_draws_the_labels_with_the_seed(tmp_path):
    config = study_synth.get_config()
    assert config.pretrain_per_seed
    runs = study.plan(config, tmp_path, tmp_path / "data", records=tmp_path / "records")
    finetune = [r for r in runs if r.kind == "finetune"]
    per_seed = sum(len(a.get("label_fractions") or config.label_fractions) for a in config.arms)
    assert len(finetune) == per_seed * len(config.seeds) and len({r.workdir for r in runs}) == len(runs)
    pretrain = [r for r in runs if r.kind == "pretrain"]
    assert len(pretrain) == len({a["name"] for a in config.arms if a.get("pretrain")}) * len(config.seeds)
    linear = next(r for r in finetune if r.arm == "simclr_seed_linear" and r.seed == 1 and r.fraction == 0.01)
    assert linear.needs == tmp_path / "runs" / "simclr_seed" / "seed1" / "pretrain"
    assert linear.record == tmp_path / "records" / "simclr_seed_linear" / "seed1_frac0.01.json"
    assert f"--config.supervised.init_from={linear.needs}" in linear.overrides
    assert "--config.supervised.finetune_mode=linear" in linear.overrides
    assert {"--config.seed=1", "--config.label_fraction=0.01", "--config.label_seed=1"} <= set(linear.overrides)
    assert runs.index(next(r for r in pretrain if r.workdir == linear.needs)) < runs.index(linear)
    # every run of an available arm builds a trainer config from exactly these flags
    for run in runs:
        if run.arm in ("scratch_unet", "simclr_large", "oracle"):
            cfg = study.trainer_config(run.config, run.overrides)
            assert cfg.seed == run.seed and cfg.data_dir == str(tmp_path / "data")
            if run.kind == "finetune":
                assert cfg.label_seed == run.seed


def test_the_oracle_fine_tunes_the_encoder_of_the_same_seeds_run_with_every_label(tmp_path):
    config = study_synth.get_config()
    runs = study.plan(config, tmp_path, tmp_path / "data", records=tmp_path / "records")
    for seed in config.seeds:
        oracle = [r for r in runs if r.arm == "oracle" and r.seed == seed]
        source = tmp_path / "runs" / "scratch_utt" / f"seed{seed}" / "frac1"
        assert sorted(r.fraction for r in oracle) == [0.01, 0.1]
        for r in oracle:
            assert r.needs == source and f"--config.supervised.init_from={source}/best" in r.overrides
            assert runs.index(next(x for x in runs if x.workdir == source)) < runs.index(r)
    # Without its source's checkpoint here (records committed elsewhere), the source runs again.
    src = next(r for r in runs if r.arm == "scratch_utt" and r.seed == 0 and r.fraction == 1.0)
    ora = [r for r in runs if r.arm == "oracle" and r.seed == 0]
    for r in (src, ora[0]):
        r.record.parent.mkdir(parents=True, exist_ok=True)
        r.record.write_text("{}")
    assert [r for r in study_run._todo(runs) if r in (src, *ora)] == [src, ora[1]]
    ora[1].record.write_text("{}")
    assert not [r for r in study_run._todo(runs) if r in (src, *ora)]


def test_the_budget_is_the_same_for_every_objective_and_never_stopped_on_the_probe(tmp_path):
    from lcssl import train

    config = study_synth.get_config()
    runs = study.plan(config, tmp_path, tmp_path / "data", records=tmp_path / "records")
    card = {"splits": {"train": {"num_examples": 1120}}}
    for run in runs:
        if run.seed != 0 or run.arm.endswith("_linear"):
            continue
        cfg = study.trainer_config(run.config, run.overrides)
        steps, per_epoch = train.schedule_lengths(cfg, card, uses_labels=run.kind == "finetune")
        if run.kind == "pretrain":  # 40 epochs of the 1,120 training patches, labels unread
            assert (cfg.split, steps, cfg.early_stop.patience) == ("train", 40 * per_epoch, 0), run.arm
            if run.arm != "simclr_seed":  # the rule: LARS, 0.3 x 128 / 256, 4 epochs of warm-up
                assert (cfg.optimizer.name, cfg.batch_size) == ("lars", 128), run.arm
                assert cfg.optimizer.learning_rate == pytest.approx(0.15), run.arm
                assert cfg.schedule.warmup_epochs == 4.0, run.arm
            else:  # the seminar's recipe, as it was
                assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.batch_size) == ("sgd", 0.001, 16)
        else:
            # 10 epochs of the labelled patches, at least 600 steps
            cap = {0.01: 600, 0.1: 600, 1.0: 1400}[run.fraction]
            assert (steps, cfg.schedule.warmup_steps, cfg.early_stop.patience) == (cap, 20, 0), run.arm


def test_the_study_passes_its_reader_to_every_run(tmp_path):
    from lcssl.data import pipeline

    config = study_synth.get_config("tiny")
    assert config.input == pipeline.DEFAULT_READER  # the trainer's default, unless --config.input=...
    for reader in (None, "native"):  # run_study passes the one that runs here (TensorFlow or not)
        runs = study.plan(config, tmp_path, tmp_path / "data", reader=reader)
        for run in (runs[0], runs[-1]):  # a pre-training and a fine-tuning
            assert study.trainer_config(run.config, run.overrides).input == (reader or config.input)


def test_the_report_says_where_each_run_ran_and_with_which_reader(tmp_path):
    records = [{**_record("scratch_utt", 0, 0.1, 0.3, 0.8, [0.3]), "input": "tfdata", "device": "1 x cpu"},
               {**_record("scratch_utt", 1, 0.1, 0.4, 0.8, [0.4]), "input": "native",
                "device": "1 x NVIDIA H100 80GB HBM3"},
               _record("scratch_utt", 2, 0.1, 0.5, 0.8, [0.5])]  # a record from before the fields
    meta = {"command": "c", "commit": "abc", "machine": "m", "date": "d", "wall_seconds_this_invocation": 1.0,
            "run_seconds_total": 1.0, "workdir": "/runs", "label_fractions": [0.1], "seeds": [0, 1, 2]}
    study.write_results(records, {"scratch_utt": "from scratch"}, {}, meta, tmp_path / "RESULTS.md")
    assert ("Finished runs by device and input reader (`input` of each record): 1 on 1 x NVIDIA H100 80GB "
            "HBM3 with native; 1 on 1 x cpu with tfdata; 1 on device not recorded with reader not recorded."
            in (tmp_path / "RESULTS.md").read_text())
    rows = (tmp_path / "results_label_efficiency.csv").read_text().splitlines()
    assert "input,device" in rows[0] and ",native,1 x NVIDIA H100 80GB HBM3," in rows[2]


def test_no_run_is_launched_after_the_budget(tmp_path):
    import time

    runs = study.plan(study_synth.get_config("tiny"), tmp_path, tmp_path / "data")
    ended = []
    failed = study_run.execute_all(runs, 1, tmp_path / "jax_cache", lambda run, outcome: ended.append(run),
                                   launch_until=time.monotonic() - 1.0)
    assert failed == {} and ended == []


def test_paired_interval_and_records_of_another_protocol():
    # differences 5, 7, 0: mean 4, std sqrt(13); t(0.975, 2 dof) = 4.3027 -> half width 8.957
    low, high = study.paired_ci([5.0, 7.0, 0.0])
    assert (low, high) == (pytest.approx(4 - 8.9566, abs=1e-3), pytest.approx(4 + 8.9566, abs=1e-3))
    assert np.isnan(study.paired_ci([1.0])[0])


def test_a_record_of_another_protocol_is_refused(tmp_path):
    config = study_synth.get_config("tiny")
    records = study.records_folder(tmp_path / "records", config)
    assert records.name == f"protocol{study_synth.PROTOCOL}"
    runs = study.plan(config, tmp_path, tmp_path / "data", records=records)
    for r in runs:
        r.protocol = config.protocol
    runs[0].record.parent.mkdir(parents=True)
    runs[0].record.write_text(json.dumps({"arm": runs[0].arm, "protocol": 1, "status": "done"}))
    with pytest.raises(study.UserError, match=f"protocol 1 in the folder of protocol {study_synth.PROTOCOL}"):
        study.collect(runs, {}, tmp_path)


def test_the_runs_table_is_the_same_from_any_machines_workdir(tmp_path):
    """The committed records, read from two workdirs (two machines), give the same table: each run's
    folder is named relative to the study's workdir."""
    config = study_synth.get_config("tiny")
    records = study.records_folder(tmp_path / "records", config)
    first = study.plan(config, tmp_path, tmp_path / "data", records=records)[0]
    first.record.parent.mkdir(parents=True)
    first.record.write_text(json.dumps({"arm": first.arm, "kind": first.kind, "protocol": config.protocol,
                                        "status": "done"}))
    tables = []
    for workdir in (tmp_path / "here", tmp_path / "elsewhere" / "study"):
        runs = study.plan(config, workdir, workdir / "data", records=records)
        tables.append(study.collect(runs, {}, workdir))
    assert tables[0] == tables[1]
    assert tables[0][0]["status"] == "done" and tables[0][1]["status"] == "not run"
    assert tables[0][0]["workdir"] == f"runs/{first.arm}/seed{first.seed}/{first.workdir.name}"


def test_pretraining_curves_show_the_loss_logged_at_or_before_each_probe():
    rec = {"arm": "simclr_large", "kind": "pretrain", "status": "done", "seed": 0, "curves": {
        "train/loss": [[20, 5.0], [40, 4.0]], "train/epoch": [[20, 2.5], [40, 5.0]],
        "probe/accuracy": [[0, 0.4], [8, 0.42], [24, 0.45], [40, 0.5]]}}
    text = "\n".join(study_report._pretraining_section([rec], {}))
    assert "| 0 | 0.0 | - | 0.400 |" in text
    assert "| 8 | 1.0 | - | 0.420 |" in text and "| 24 | 3.0 | 5.0000 (step 20) | 0.450 |" in text
    assert "| 40 | 5.0 | 4.0000 | 0.500 |" in text


def test_arms_the_trainer_does_not_know_are_not_available():
    config = study_synth.get_config("tiny")
    arms = {a["name"]: a for a in config.arms}
    assert study.unavailable_reason(arms["scratch_utae"], arms) is None
    assert study.unavailable_reason(arms["simclr_seed_linear"], arms) is None
    made_up = {"name": "x", "label": "x", "pretrain": None,
               "finetune": {"config": "configs/sup_hameln.py:tiny", "overrides": ["--config.no_such_field=1"]}}
    assert "no_such_field" in study.unavailable_reason(made_up, arms)
    old = {**arms["simclr_seed_linear"], "name": "x",
           "finetune": {**arms["simclr_seed_linear"]["finetune"], "overrides": ["--config.finetune_mode=linear"]}}
    assert study.unavailable_reason(old, {**arms, "x": old}).endswith(
        "--config.finetune_mode is now --config.supervised.finetune_mode (supervised settings moved under "
        "config.supervised)")
    unknown = {**arms["vicreg"], "name": "x",
               "pretrain": {**arms["vicreg"]["pretrain"], "overrides": ["--config.task=mae"]}}
    assert "no task 'mae'" in study.unavailable_reason(unknown, {**arms, "x": unknown})
    # Every arm of the study is one the trainer runs (the end-to-end test runs a few of them).
    assert [a["name"] for a in config.arms if study.unavailable_reason(a, arms)] == []


@pytest.mark.slow
def test_tiny_study_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    """The real command on a few arms (each run is a process that compiles its own programs: every
    arm would take ~10 min of the suite; that every arm's config is one the trainer accepts is the
    test above): the runs finish, the report and plot are written; a rerun runs nothing."""
    results = tmp_path / "report" / "RESULTS.md"
    arms = ("scratch_utt", "oracle", "simclr_seed", "simclr_seed_linear", "dense")
    cmd = [sys.executable, "-m", "lcssl.study", "--config=configs/study_synth.py:tiny",
           f"--config.only_arms={','.join(arms)}", f"--workdir={tmp_path / 'study'}", f"--results={results}",
           "--parallel=2"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = json.loads((results.parent / "results_label_efficiency.json").read_text())
    config = study_synth.get_config("tiny")
    assert saved["not_available"] == {}
    done = {r["arm"] for r in saved["runs"] if r["status"] == "done"}
    assert done == set(arms), [r for r in saved["runs"] if r["status"] != "done"]
    finetuned = [r for r in saved["runs"] if r["kind"] == "finetune"]
    assert len(finetuned) == len(arms) and all(0.0 <= r["test_miou"] <= 1.0 for r in finetuned)
    pretrained = [r for r in saved["runs"] if r["kind"] == "pretrain"]
    assert {r["arm"] for r in pretrained} == {"simclr_seed", "dense"}
    assert all(r["curves"]["train/loss"] and r["timing"]["train_steps_s"] > 0 for r in pretrained)
    text = results.read_text()
    assert "from scratch, U-T&T (fused)" in text and (results.parent / study.PLOT_NAME).is_file()
    logs = sorted((tmp_path / "study" / "runs").rglob("log.txt"))
    before = {p: p.stat().st_mtime_ns for p in logs}

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    total = len(arms) * len(config.label_fractions) + 2  # + the simclr_seed and dense pre-trainings
    assert f"Study: {total} runs ({total} already finished)" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    # The records alone (committed, checkpoints elsewhere) finish the study on another machine.
    records = sorted((results.parent / "study_records").rglob("*.json"))
    assert len(records) == total
    shutil.rmtree(tmp_path / "study" / "runs")
    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and f"({total} already finished)" in third.stdout, third.stderr[-3000:]
    assert json.loads((results.parent / "results_label_efficiency.json").read_text())["runs"] == saved["runs"]
