"""The ``pancseg`` command line: parse, load the config, call one stage, print a summary.

Heavy libraries (torch, nnU-Net) are imported inside the stages so that ``--help`` stays fast.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pancreas_cli import __version__
from pancreas_cli.config import CONFIG_TEMPLATE, Config, load_config
from pancreas_cli.console import count, output
from pancreas_cli.demo import DemoBudget
from pancreas_cli.exceptions import ConfigError, OutputExistsError, PancsegError
from pancreas_cli.signals import Terminated, sigterm_as_interrupt

app = typer.Typer(
    name="pancseg",
    help="Pancreas and lesion segmentation with lesion subtype classification on nnU-Net v2.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Boxed help and usage errors on a terminal; plain text in Colab `!` cells, CI logs and pipes.
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = Path("pancseg.yaml")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config (default: ./pancseg.yaml).", show_default=False,
                 metavar="PATH"),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.epochs=50 (repeatable).", show_default=False,
                 metavar="KEY=VALUE"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
# Not a config key: a config shipped with a model could otherwise switch the check off.
TrustModelOption = Annotated[bool, typer.Option(
    "--trust-model", help="Load checkpoints in full even if they hold more than nnU-Net's (a model file can then run "
                          "code: only for files from a source you trust).")]


def _show_traceback() -> None:
    if output.debug:
        output.err.print(traceback.format_exc(), markup=False)


def handle_errors(func: F) -> F:
    """Turn pancseg errors, and the file system's (OSError), into one message on stderr and their exit
    code (tracebacks with --debug); an interrupt (Ctrl-C, SIGTERM) says that finished work is kept and
    exits 130 (143 for SIGTERM)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except PancsegError as exc:
            _show_traceback()
            output.error(str(exc))
            raise typer.Exit(128 + signal.SIGTERM if isinstance(exc.__context__, Terminated)
                             else exc.exit_code) from None
        except OSError as exc:  # the machine's problem (a full disk, permissions), said without a traceback
            _show_traceback()
            advice = {errno.ENOSPC: "; free some space there", errno.EDQUOT: "; free some space there",
                      errno.EACCES: "; check the permissions there", errno.EPERM: "; check the permissions there",
                      errno.EROFS: "; that file system is read-only"}.get(exc.errno or 0, "")
            output.error(f"{exc}{advice} (--debug shows where it happened)")
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            _show_traceback()
            output.error("interrupted; finished work is kept: run the same command again to continue")
            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            raise typer.Exit(128 + signum) from None

    return wrapper  # type: ignore[return-value]


def _config(path: Path | None, overrides: list[str] | None, *, check_source: bool = False, optional: bool = False,
            **flags: Any) -> Config:
    """The layered config; ``./pancseg.yaml`` when no path is given (defaults if ``optional``)."""
    if path is None:
        if DEFAULT_CONFIG.is_file():
            path = DEFAULT_CONFIG
        elif not optional:
            raise ConfigError(["no config given: pass -c CONFIG, or create pancseg.yaml with `pancseg init`"])
    return load_config(path, overrides or [], flags, check_source=check_source)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pancseg {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More diagnostics.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only results and errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """Pancreas CT: prepare, clean, preprocess, train and predict with nnU-Net v2."""
    output.verbosity = -1 if quiet else (1 if verbose else 0)
    output.debug = debug


@app.command()
@handle_errors
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter config.")] = DEFAULT_CONFIG,
) -> None:
    """Write a commented starter config (never overwrites)."""
    from pancreas_cli.imageio import write_text

    if path.exists():
        raise OutputExistsError(f"{path} already exists; pick another path or edit it")
    write_text(CONFIG_TEMPLATE.read_text(encoding="utf-8"), path)
    output.result(f"wrote {path}; edit dataset.source, then run `pancseg prepare -c {path}`")


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise typer.BadParameter(f"expected Z,Y,X like 32,64,64, got {text!r}")
    return shape  # type: ignore[return-value]


@app.command()
@handle_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    cases: Annotated[int, typer.Option("--cases", "-n", min=1, help="Number of cases.")] = 12,
    shape: Annotated[str, typer.Option(help="Volume shape Z,Y,X.")] = "32,64,64",
    layout: Annotated[str, typer.Option(help="quiz or seed.")] = "quiz",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    quirks: Annotated[bool, typer.Option("--quirks", help="Plant real-data problems for `clean`.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier synth dataset in OUT_DIR.")] = False,
    cues: Annotated[str, typer.Option(help="What tells the subtypes apart: mixed, attenuation, texture, shape "
                                           "or size.")] = "mixed",
    cue_overlap: Annotated[float, typer.Option(help="How alike the subtypes' cues are, 0 (as defined) to 1 "
                                                    "(identical).")] = 0.0,
) -> None:
    """Write a tiny deterministic synthetic pancreas CT dataset."""
    from pancreas_cli.synth import synthesize

    if layout not in ("quiz", "seed"):
        raise typer.BadParameter(f"must be quiz or seed, got {layout!r}", param_hint="--layout")
    result = synthesize(out_dir, cases=cases, shape=_shape(shape), layout=layout, seed=seed,  # type: ignore[arg-type]
                        quirks=quirks, force=force, cues=cues, cue_overlap=cue_overlap)
    for quirk in result.quirks:
        output.detail(f"quirk: {quirk}")
    splits = {s: sum(c.split == s for c in result.cases) for s in ("train", "validation", "test")}
    output.result(
        f"wrote {len(result.cases)} synthetic cases ({splits['train']} train, {splits['validation']} validation, "
        f"{splits['test']} test; layout {layout}) to {out_dir}"
        + (f"; planted {len(result.quirks)} quirks" if quirks else "")
    )


@app.command()
@handle_errors
def prepare(
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a different existing dataset.")] = False,
    json_: JsonOption = False,
) -> None:
    """Build the nnU-Net raw dataset (imagesTr, labelsTr, dataset.json, splits, subtypes)."""
    from pancreas_cli.prepare import prepare as run_prepare

    result = run_prepare(_config(config, set_, check_source=True), force=force)
    for note in result.notes:
        output.warn(note)
    if json_:
        output.json(result.to_dict())
        return
    state = "up to date" if result.up_to_date else "prepared"
    counts = result.subtype_counts
    output.result(
        f"{state}: {result.dataset_dir} — {result.count('train')} train, {result.count('validation')} validation, "
        f"{result.count('test')} test; subtypes 0/1/2: {counts[0]}/{counts[1]}/{counts[2]}; "
        f"{result.folds} folds" + (" (fold 0 = official validation split)" if result.official_split else "")
    )


@app.command()
@handle_errors
def clean(
    config: ConfigOption = None,
    set_: SetOption = None,
    check: Annotated[bool, typer.Option("--check", help="Change nothing; exit 1 if anything needs fixing.")] = False,
    json_: JsonOption = False,
) -> None:
    """Audit every prepared case and fix what is safe to fix (originals are kept)."""
    from pancreas_cli.clean import clean as run_clean

    result = run_clean(_config(config, set_), check=check)
    if json_:
        output.json(result.to_dict())
    else:
        # Under --check nothing was fixed: a pending fix is only "fixable".
        rows = [("fixable" if result.check and f.pending else f.severity, f.case, f.problem, f.detail, f.action)
                for f in result.findings]
        if rows:
            output.table("clean findings", ["severity", "case", "problem", "detail", "action"], rows)
        output.result(result.summary())
    if result.errors or (check and result.fixable):
        raise typer.Exit(1)


@app.command()
@handle_errors
def preprocess(
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run even if up to date.")] = False,
    json_: JsonOption = False,
) -> None:
    """Fingerprint, plan (ResEnc-M) and preprocess with nnU-Net, with its integrity check."""
    from pancreas_cli.preprocess import preprocess as run_preprocess

    result = run_preprocess(_config(config, set_), force=force, on_start=lambda: output.info(
        "running nnU-Net fingerprinting, planning and preprocessing ..."))
    if json_:
        output.json(result.to_dict())
        return
    rows = [(p.configuration, p.patch_size, p.spacing, p.batch_size, f"{p.n_parameters:,}") for p in result.plans]
    output.table(f"{result.plans_identifier}", ["configuration", "patch size", "spacing (mm)", "batch", "parameters"], rows)
    output.result(("up to date: " if result.up_to_date else "preprocessed: ") + str(result.output_dir))
    output.info(f"nnU-Net log: {result.log_file}")


def _folds(values: list[str] | None, num_folds: int) -> list[int] | None:
    """The folds asked for; None for 'all' (every fold of the dataset's splits)."""
    if not values:
        return [0]
    if values == ["all"]:
        return None
    try:
        folds = [int(v) for v in values]
    except ValueError:
        raise typer.BadParameter(f"folds are numbers or 'all', got {values}", param_hint="--fold") from None
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad:
        raise typer.BadParameter(f"fold {bad[0]} outside 0..{num_folds - 1}", param_hint="--fold")
    return folds


@app.command()
@handle_errors
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[list[str] | None, typer.Option("--fold", "-f", help="Fold (repeatable) or 'all'. Default 0.", metavar="N|all")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Discard an existing training of the fold.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    task: Annotated[str | None, typer.Option(help="multitask or segmentation (stock nnU-Net).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs (overrides train.epochs).")] = None,
    num_gpus: Annotated[int | None, typer.Option("--num-gpus", help="GPUs for nnU-Net's DDP training.")] = None,
    trust_model: TrustModelOption = False,
    json_: JsonOption = False,
) -> None:
    """Train the multi-task model (or stock nnU-Net) with nnU-Net v2's machinery."""
    from pancreas_cli.progress import EpochPrinter
    from pancreas_cli.train import train as run_train

    cfg = _config(config, set_, **{"train.device": device, "train.task": task, "train.epochs": epochs,
                                   "train.num_gpus": num_gpus})
    if cfg.train.device == "cpu":
        output.warn("training on the CPU is very slow; use it for smoke runs only")
    result = run_train(cfg, folds=_folds(fold, cfg.dataset.num_folds), resume=resume, force=force,
                       reporter=EpochPrinter(quiet=output.verbosity < 0), trust_model=trust_model, warn=output.warn)
    for done in (f for f in result.folds if f.up_to_date):
        output.info(f"fold {done.fold} up to date: trained to epoch {done.epochs_done} and validated")
    if json_:
        output.json(result.to_dict())
        return
    rows = [(f.fold, f.epochs_done, f.last.get("dice_pancreas"), f.last.get("dice_lesion"),
             f.last.get("val_macro_f1"), f"{f.seconds:.0f}s", str(f.output_folder)) for f in result.folds]
    output.table(f"{result.trainer} on {result.device}",
                 ["fold", "epochs", "dice pancreas", "dice lesion", "macro-F1", "time", "folder"], rows)


@app.command()
@handle_errors
def predict(
    input_: Annotated[Path, typer.Option("--input", "-i", help="Image file, folder of images, or DICOM series folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for masks and subtype CSVs.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[list[int] | None, typer.Option("--fold", "-f", help="Fold(s) to ensemble (default: all trained).", metavar="N")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="best or final.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="No test-time mirroring: about 8x faster, slightly less accurate.")] = False,
    force: Annotated[bool, typer.Option("--force", "--overwrite",
                                        help="Predict every case again, replacing existing masks.")] = False,
    series: Annotated[str | None, typer.Option("--series", help="The series of a DICOM folder to segment (default: "
                                               "the one with the most slices).", metavar="UID")] = None,
    trust_model: TrustModelOption = False,
    json_: JsonOption = False,
) -> None:
    """Predict masks (labels 0/1/2) and lesion subtypes (subtype_results.csv) for new CT scans."""
    from pancreas_cli.predict import predict as run_predict
    from pancreas_cli.progress import CasePrinter

    if checkpoint not in (None, "best", "final"):
        raise typer.BadParameter(f"must be best or final, got {checkpoint!r}", param_hint="--checkpoint")
    cfg = _config(config, set_, **{"predict.device": device, "predict.checkpoint": checkpoint})
    result = run_predict(cfg, input_path=input_, out_dir=out, folds=fold, fast=fast, overwrite=force, series=series,
                         reporter=CasePrinter(quiet=output.verbosity < 0), warn=output.warn, trust_model=trust_model)
    if json_:
        output.json(result.to_dict())
    else:
        speed = result.cases_per_minute()
        output.result(f"{result.count('predicted')} predicted"
                      + (f" in {result.seconds:.1f}s ({speed:.1f} cases/min)" if speed else "")
                      + f", {result.count('skipped')} skipped (already done), "
                      f"{len(result.failed)} failed -> {result.out_dir}"
                      + (f"; subtypes: {result.subtype_csv}" if result.subtype_csv else ""))
    for failure in result.failed:
        output.error(f"{failure.source}: {failure.error}")
    if result.failed:
        output.info(f"full errors: {result.log_file}")
        raise typer.Exit(1)


@app.command()
@handle_errors
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted masks (and subtype_results.csv).")],
    gt: Annotated[Path, typer.Option("--gt", help="Folder of ground-truth masks.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    subtypes: Annotated[Path | None, typer.Option("--subtypes", help="True subtypes: CSV case_id,subtype or Names,Subtype.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Count missing predictions as empty.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the metrics (default: --pred).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace metrics of other inputs in the output folder.")] = False,
    json_: JsonOption = False,
) -> None:
    """Dice, IoU, NSD, HD95, volumes and subtype metrics, with bootstrap CIs and target pass/fail."""
    from pancreas_cli.evaluate import evaluate as run_evaluate

    cfg = _config(config, set_, optional=True)
    result = run_evaluate(cfg, pred_dir=pred, gt_dir=gt, subtypes_csv=subtypes, allow_missing=allow_missing,
                          out_dir=out, force=force)
    for note in result.notes:
        output.warn(note)
    if json_:
        output.json(result.summary)
        return
    output.table("evaluation", ["metric", "mean", "median", "95% CI", "target", "pass"], _summary_rows(result.summary))
    output.result(f"{count(len(result.cases), 'case')}; per case: {result.per_case_csv}; summary: {result.summary_json}")


def _passed(target: dict[str, Any] | None) -> str:
    if target is None:
        return ""
    return "n/a" if target["passed"] is None else ("yes" if target["passed"] else "NO")


def _summary_rows(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    targets = summary["targets"]
    for key, stats in summary["segmentation"].items():
        ci = "" if stats["ci95_low"] is None else f"{stats['ci95_low']:.3f}-{stats['ci95_high']:.3f}"
        target = targets.get(key)
        rows.append((key, stats["mean"], stats["median"], ci, target["target"] if target else "",
                     _passed(target)))
    cls = summary["classification"]
    if cls:
        target = targets["macro_f1"]
        rows.append(("macro_f1", cls["macro_f1"], "", "", target["target"], _passed(target)))
        rows.append(("accuracy", cls["accuracy"], "", "", "", ""))
    return rows


@app.command()
@handle_errors
def report(
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[int, typer.Option("--fold", "-f", help="Fold whose training curves to show.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default: project_dir/report/).")] = None,
    pred: Annotated[Path | None, typer.Option("--pred", help="Predictions evaluated by `pancseg evaluate`.")] = None,
    gt: Annotated[Path | None, typer.Option("--gt", help="Ground-truth masks (for the overlays).")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="CT images (for the overlays).")] = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", help="Where `pancseg evaluate -o` wrote (default: --pred).")] = None,
    json_: JsonOption = False,
) -> None:
    """One self-contained HTML report: training curves, evaluation, overlays and provenance."""
    from pancreas_cli.report import report as run_report
    from pancreas_cli.report import require_folder

    for path, what in ((pred, "--pred"), (gt, "--gt"), (images, "--images"), (metrics, "--metrics")):
        require_folder(path, what)
    result = run_report(_config(config, set_), fold=fold, out_html=out, pred_dir=pred, gt_dir=gt, images_dir=images,
                        metrics_dir=metrics)
    for note in result.notes:
        output.warn(note)
    if json_:
        output.json(result.to_dict())
        return
    for line in result.summary_lines:
        output.result(line)
    output.result(f"report: {result.html} ({len(result.pngs)} figures)")


class _StagePrinter:
    def __call__(self, stage: str, what: str, seconds: float) -> None:
        output.info(f"[{stage}] {what} ({seconds:.0f}s)")


def _run(cfg: Config, fold: int, trust_model: bool = False) -> None:
    from pancreas_cli.progress import CasePrinter, EpochPrinter
    from pancreas_cli.run import run as run_pipeline

    quiet = output.verbosity < 0
    result = run_pipeline(cfg, fold=fold, on_stage=_StagePrinter(), epoch_reporter=EpochPrinter(quiet=quiet),
                          case_reporter=CasePrinter(quiet=quiet), warn=output.warn, trust_model=trust_model)
    for line in result.report.summary_lines:
        output.result(line)
    if result.predictions:
        output.result(f"predictions: {result.predictions} (masks + subtype_results.csv)")
    output.result(f"report: {result.report.html}")


@app.command()
@handle_errors
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[int, typer.Option("--fold", "-f", help="Fold to train and evaluate.")] = 0,
    trust_model: TrustModelOption = False,
) -> None:
    """prepare -> clean -> preprocess -> train -> predict -> evaluate -> report, skipping what is up to date."""
    _run(_config(config, set_, check_source=True), fold, trust_model)


@app.command()
@handle_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the synthetic data, model and report.")] = Path("pancseg_demo"),
    cases: Annotated[int, typer.Option(min=6, help="Synthetic cases.")] = DemoBudget.cases,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = DemoBudget.epochs,
    iterations: Annotated[int, typer.Option(min=1, help="Training iterations per epoch.")] = DemoBudget.iterations,
) -> None:
    """The whole pipeline on synthetic data with the smoke preset on the CPU (a few minutes)."""
    from pancreas_cli.demo import prepare_demo

    output.info(f"pancseg demo in {workdir}: {cases} synthetic cases, {epochs} epochs x {iterations} iterations on the CPU")
    _run(prepare_demo(workdir, DemoBudget(cases, epochs, iterations)), 0)
    # A new user reads pass/FAIL against the targets above as a verdict on the tool.
    output.info("demo: the targets are the real data's, for full training on a GPU; a few minutes of a tiny network "
                "on synthetic cases are not meant to reach them (BENCHMARKS.md has the demo's usual numbers)")


@app.command()
@handle_errors
def doctor(
    config: ConfigOption = None,
    set_: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Check the environment (Python, torch, nnU-Net, CUDA, disk, shared memory) and the config."""
    from pancreas_cli.doctor import doctor as run_doctor

    report = run_doctor(config if config is not None else DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None,
                        set_ or [])
    if json_:
        output.json(report.to_dict())
    else:
        output.table("pancseg doctor", ["check", "status", "detail"], [(c.name, c.status, c.detail) for c in report.checks])
    if report.blocking:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
