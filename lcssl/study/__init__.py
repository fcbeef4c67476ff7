"""The label-efficiency study (a package: plan, run, stats, report; `python -m lcssl.study`): arms x label fractions x seeds -> a results table, a plot, raw results.

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study
    python -m lcssl.study --config=configs/study_synth.py:tiny --workdir=/tmp/study --results=/tmp/R.md

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study --parallel=2

Each run is what `python -m lcssl.main --config=<arm's config> --workdir=<run dir> <overrides>`
does (the same config flags, `lcssl.train.run`), executed inside one of --parallel worker
processes that each import JAX and TensorFlow once and run one run after another (one log file
per run: `<run dir>/log.txt`); the workers share the host's cores between them (CPU affinity) and
the persistent compilation cache, so the study's time goes into training, not start-up. Layout of
--workdir:

    data/                          the benchmark, synthesised and built once (unless data.data_dir)
    runs/<arm>/seed<S>/pretrain/   one pre-training per arm and seed (config.pretrain_per_seed), or
    runs/<arm>/pretrain/           one per arm shared by every fine-tuning seed
    runs/<arm>/seed<S>/frac<F>/    fine-tuning at label fraction F (eval_results.json: test scores)
    jax_cache/                     compiled programs, shared by all runs (same program, no recompile)

Every finished run leaves a small record (scores, curves, seconds, command, commit, machine) in
`<--records>/protocol<N>/` (--records default: `study_records/` beside --results; N the config's
protocol version: records of different versions are never mixed), meant to be committed: a run with a record
is never run again, on this machine or another, and the report is made from the records alone
(checkpoints stay in --workdir, out of git). A run whose checkpoint another run starts from (a
pre-training, the oracle's source) is run again only when a run that needs it has no record yet. Any other run resumes from its checkpoints.
`--budget_s=S` launches no run after S seconds (the running ones finish, the report is written, the
same command continues later); every run reads the shards with `--config.input` (tfdata | native:
'native' where TensorFlow is absent), and its record says which reader and device it ran with.
`--report_only` writes the report from the records as they are; a hand-written `NOTES.md` beside
them becomes the report's "What was tried". An arm whose overrides the trainer's config rejects (a field it
does not have, such as `task` before the objectives exist) is "not available" in the report, with
the trainer's reason. The report (--results, default docs/RESULTS.md) holds mean +- std over seeds
(numpy, ddof=1) of test mIoU and OA per arm x label fraction, the paired difference to from-scratch
U-T&T per seed, the per-class IoU of the best arm against from-scratch at 10% labels, the plot
`results_label_efficiency.png`, and `results_label_efficiency.json` / `.csv` with every run, beside it.
"""
from lcssl.errors import UserError
from lcssl.study.plan import (BASELINE, ORACLE, Run, plan, records_folder, selected_arms, trainer_config,
                              unavailable_reason)
from lcssl.study.report import PLOT_NAME, write_results
from lcssl.study.run import collect, execute, make_record, prepare_data, run_study
from lcssl.study.stats import MIN_SEEDS, best_arm, paired_ci, per_class_iou, summarize

__all__ = ["BASELINE", "ORACLE", "MIN_SEEDS", "PLOT_NAME", "Run", "UserError", "best_arm", "collect",
           "execute", "make_record", "paired_ci", "per_class_iou", "plan", "prepare_data", "records_folder", "run_study",
           "selected_arms", "summarize", "trainer_config", "unavailable_reason", "write_results"]
