"""Evaluate a trained run, or a folder of predictions against a folder of labels.

    autocontext evaluate --workdir runs/default [--data DIR]
    autocontext evaluate --model model.zip --data DIR [--output DIR]
    autocontext evaluate --predictions segs --labels labelsTs [--label_map=totalsegmentator]
    autocontext evaluate --cv RUN_fold-0,RUN_fold-1,...,RUN_fold-4 [--cv_out DIR]
    autocontext evaluate --cv FOLDER_OF_FOLD_RUNS

With --workdir, scores the run's newest checkpoint on its held-out cases (or every case
of another dataset) and writes eval_cases.json and eval_summary.{md,csv,json} into the
workdir. With --model (a file of `autocontext export`) and --data, scores every case of
the dataset and writes the same reports into --output (default: MODEL_evaluation/ beside
the file). With --predictions and --labels (no run needed), matches CASE.nii.gz to
CASE.nii.gz and writes Dice, HD95 and NSD per case and class, and their means, to
PREDICTIONS/summary.json (or --summary). Structures the references do not label (none
of them holds it, --classes leaves it out, or the dataset.json beside the labels does not
list it) are "not labelled": a dash in the tables, null in JSON, out of every average. A
prediction without a reference, or a reference without a prediction, is one warning line
naming the cases (an error with --strict). With --cv, the k fold runs of one config
(trained with --config.data.fold=F, listed or as the subfolders of one folder): every case
scored once, by the fold run that held it out, in one Table-1 summary written to --cv_out
(default: the one folder given, or RUN_cv beside the runs, RUN their common name without
its fold): eval_cases.json and eval_summary.{md,csv,json}, as a run's, so `autocontext
compare` takes it.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from autocontext_jax.cli.common import (
    COMPILATION_CACHE,
    checked_flag,
    no_arguments,
    quiet_logging,
    run_command,
)
from autocontext_jax.config import schema
from autocontext_jax.data.labels import LABEL_MAP_PRESETS, NUM_PAPER_CLASSES, parse_label_map
from autocontext_jax.evaluation import crossval
from autocontext_jax.evaluation.evaluate import evaluate_model_file, evaluate_workdir
from autocontext_jax.evaluation.folders import (
    SUMMARY_FILE,
    dataset_labelled_classes,
    evaluate_folders,
    parse_classes,
    unmatched_line,
    write_summary,
)
from autocontext_jax.evaluation.reports import summary_markdown

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command line's flags."""
    flags.DEFINE_string("workdir", None, "A training workdir (or --predictions and --labels).")
    flags.DEFINE_string("model", None, "A model file of `autocontext export` (with --data).")
    flags.DEFINE_string(
        "output", None, "Where --model's reports go (default: MODEL_evaluation/ beside it)."
    )
    flags.DEFINE_string("predictions", None, "A folder of label maps, CASE.nii.gz.")
    flags.DEFINE_string("labels", None, "A folder of reference label maps, CASE.nii.gz.")
    flags.DEFINE_integer(
        "num_classes", NUM_PAPER_CLASSES, "Classes of the predictions, background included."
    )
    flags.DEFINE_string(
        "label_map",
        None,
        "Ids of the --labels files as classes: ID:CLASS,ID:CLASS,... or "
        f"{' or '.join(LABEL_MAP_PRESETS)} (default: the ids are the classes).",
    )
    flags.DEFINE_string(
        "classes",
        None,
        "The structures the references label, e.g. liver,spleen (default: those any "
        "reference holds, and the dataset.json beside the labels lists)",
    )
    flags.DEFINE_bool(
        "strict", False, "A prediction without a reference, or the reverse, is an error."
    )
    flags.DEFINE_string("summary", None, "Where to write summary.json (default: PREDICTIONS/).")
    flags.DEFINE_string(
        "data", None, "Evaluate every case of this dataset instead of the run's held-out cases."
    )
    flags.DEFINE_float(
        "nsd_tolerance_mm",
        None,
        "Surface Dice tolerance in mm (default: the run's config, "
        f"{schema.default('eval.nsd_tolerance_mm'):g} for folders).",
    )
    flags.DEFINE_list(
        "cv", None, "Fold runs of one config (or one folder of them): a cross-validated summary."
    )
    flags.DEFINE_string("cv_out", None, "Where --cv writes its summary (default: see above).")
    flags.register_validator(
        "nsd_tolerance_mm", lambda value: value is None or value > 0, "must be > 0 mm"
    )


def evaluate_predictions() -> None:
    """Score --predictions against --labels, print the tables and write summary.json."""
    if FLAGS.predictions is None or FLAGS.labels is None:
        raise app.UsageError("--predictions and --labels go together")
    tolerance = FLAGS.nsd_tolerance_mm
    if tolerance is None:
        tolerance = schema.default("eval.nsd_tolerance_mm")
    path = pathlib.Path(FLAGS.summary or pathlib.Path(FLAGS.predictions) / SUMMARY_FILE)
    label_map = ()
    if FLAGS.label_map is not None:
        label_map = checked_flag(
            lambda: parse_label_map(FLAGS.label_map, FLAGS.num_classes), "label_map"
        )
    labelled = dataset_labelled_classes(pathlib.Path(FLAGS.labels), FLAGS.num_classes, label_map)
    if FLAGS.classes is not None:
        labelled = checked_flag(lambda: parse_classes(FLAGS.classes, FLAGS.num_classes), "classes")
    result = evaluate_folders(
        FLAGS.predictions,
        FLAGS.labels,
        FLAGS.num_classes,
        label_map,
        "background",
        tolerance,
        labelled=labelled,
        strict=FLAGS.strict,
    )
    if result["unmatched"]:
        print(f"Warning: {unmatched_line(result['unmatched'])}", file=sys.stderr, flush=True)
    write_summary(path, result)
    print(summary_markdown(result))
    print(f"Wrote {path}")


def evaluate_cross_validation() -> None:
    """Join the --cv fold runs' held-out scores into one summary, print and write it."""
    if FLAGS.workdir is not None or FLAGS.predictions is not None or FLAGS.model is not None:
        raise app.UsageError("--cv goes alone: not with --workdir, --model or --predictions")
    workdirs = crossval.fold_workdirs(FLAGS.cv)
    result = crossval.cross_validate(workdirs, FLAGS.nsd_tolerance_mm)
    out = pathlib.Path(FLAGS.cv_out or crossval.default_output(FLAGS.cv))
    crossval.write_cross_validation(out, result)
    cases, folds = len(result["case_ids"]), len(result["runs"])
    print(f"{cases} cases, each scored by the one of the {folds} fold runs that held it out")
    print(summary_markdown(result))
    print(f"Wrote eval_cases.json, eval_summary.{{md,csv,json}} and {crossval.CV_FILE} into {out}")


def main(argv: list[str]) -> None:
    """Evaluate a training workdir, a folder of predictions, or the fold runs of one config."""
    no_arguments(argv)
    quiet_logging()
    if FLAGS.cv is not None:
        evaluate_cross_validation()
        return
    if FLAGS.model is not None:
        if FLAGS.workdir is not None or FLAGS.data is None:
            raise app.UsageError("--model goes with --data (the cases to score), not --workdir")
        model_file = pathlib.Path(FLAGS.model)
        output = FLAGS.output or model_file.with_name(f"{model_file.stem}_evaluation")
        result = evaluate_model_file(
            model_file, FLAGS.data, output, FLAGS.nsd_tolerance_mm, COMPILATION_CACHE
        )
        print(summary_markdown(result))
        print(f"Wrote eval_cases.json and eval_summary.{{md,csv,json}} into {output}")
        return
    if FLAGS.workdir is None:
        if FLAGS.predictions is None and FLAGS.labels is None:
            raise app.UsageError("give --workdir, or --predictions and --labels")
        evaluate_predictions()
        return
    result = evaluate_workdir(FLAGS.workdir, FLAGS.data, FLAGS.nsd_tolerance_mm, COMPILATION_CACHE)
    print(summary_markdown(result))
    print(f"Wrote eval_cases.json and eval_summary.{{md,csv,json}} into {FLAGS.workdir}")


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command (`argv` defaults to sys.argv)."""
    run_command(__doc__, define_flags, main, argv, computes=True)


if __name__ == "__main__":
    run()
