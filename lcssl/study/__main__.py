"""`python -m lcssl.study`: flags -> run_study (lcssl/study/__init__.py says what it does)."""
from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from lcssl.errors import UserError
from lcssl.study.run import run_study


def define_flags(values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
    """The command's flags, defined in `values` (here when the command runs: lcssl.main has flags of
    the same names; a test parses an example command line into fresh FlagValues with its sys_argv)."""
    config_flags.DEFINE_config_file("config", None, "Study config: configs/study_synth.py[:preset]",
                                    flag_values=values, lock_config=True, sys_argv=sys_argv)
    flags.DEFINE_string("workdir", None, "Where the data, every run and its logs go.", flag_values=values)
    flags.DEFINE_string("results", "docs/RESULTS.md",
                        "The report; the plot, JSON and CSV are written beside it.", flag_values=values)
    flags.DEFINE_string("records", "", "Where finished runs' records go ('' = study_records/ beside "
                        "--results); commit them to resume the study elsewhere.", flag_values=values)
    flags.DEFINE_integer("parallel", 1, "Runs side by side, each in its own worker process with "
                         "1/N of the host's cores (and of the GPU's memory).", flag_values=values)
    flags.DEFINE_float("budget_s", 0.0, "Seconds after the start when no new run is launched: the "
                       "runs running then finish, the report is written, and the same command later "
                       "continues from the records (0 = no limit).", flag_values=values)
    flags.DEFINE_bool("report_only", False, "Write the report from the records as they are, "
                      "running nothing (runs without a record show as 'not run').", flag_values=values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    command = " ".join(["python -m lcssl.study", *sys.argv[1:]])
    from lcssl.files import refuse_remote

    for name in ("workdir", "results", "records"):
        refuse_remote(flags.FLAGS[name].value, f"--{name}")
    refuse_remote(flags.FLAGS.config.data.data_dir, "--config.data.data_dir")
    if flags.FLAGS.parallel < 1:
        raise UserError(f"--parallel={flags.FLAGS.parallel}: at least 1 worker")
    if flags.FLAGS.budget_s < 0:
        raise UserError(f"--budget_s={flags.FLAGS.budget_s:g}: 0 (no limit) or more seconds")
    try:
        run_study(flags.FLAGS.config, pathlib.Path(flags.FLAGS.workdir), pathlib.Path(flags.FLAGS.results),
                  command, pathlib.Path(flags.FLAGS.records) if flags.FLAGS.records else None,
                  flags.FLAGS.parallel, flags.FLAGS.report_only, flags.FLAGS.budget_s)
    except (ValueError, RuntimeError) as e:  # the plan's and the data preparation's own errors
        raise UserError(f"python -m lcssl.study: {e}") from e
    return 0


if __name__ == "__main__":
    from lcssl import cli

    define_flags()
    app.run(cli.user_errors(main), flags_parser=cli.parse_flags)
