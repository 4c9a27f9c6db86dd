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
    add_completion=True,  # --install-completion and --show-completion (bash, zsh, fish, PowerShell)
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
WaitOption = Annotated[bool, typer.Option("--wait", help="Wait for another pancseg command that holds the project, "
                                          "fold or output folder instead of failing (locks.wait).")]
WaitSecondsOption = Annotated[float | None, typer.Option(
    "--wait-seconds", min=0.001, help="Wait as --wait, failing after this many seconds (locks.wait_seconds).",
    metavar="SECONDS", show_default=False)]
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
            wait: bool = False, wait_seconds: float | None = None, **flags: Any) -> Config:
    """The layered config; ``./pancseg.yaml`` when no path is given (defaults if ``optional``). Its
    ``locks`` settings (with ``--wait``, ``--wait-seconds``) apply to every lock the command takes."""
    from pancreas_cli import locks

    if path is None:
        if DEFAULT_CONFIG.is_file():
            path = DEFAULT_CONFIG
        elif not optional:
            raise ConfigError(["no config given: pass -c CONFIG, or create pancseg.yaml with `pancseg init`"])
    flags.update({"locks.wait": True if wait or wait_seconds is not None else None,
                  "locks.wait_seconds": wait_seconds})
    config = load_config(path, overrides or [], flags, check_source=check_source)
    locks.wait_for_locks(config.locks.wait, config.locks.wait_seconds)
    return config


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
    wait: WaitOption = False,
    wait_seconds: WaitSecondsOption = None,
    json_: JsonOption = False,
) -> None:
    """Build the nnU-Net raw dataset (imagesTr, labelsTr, dataset.json, splits, subtypes)."""
    from pancreas_cli.prepare import prepare as run_prepare

    result = run_prepare(_config(config, set_, check_source=True, wait=wait, wait_seconds=wait_seconds), force=force)
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
    wait: WaitOption = False,
    wait_seconds: WaitSecondsOption = None,
    json_: JsonOption = False,
) -> None:
    """Audit every prepared case and fix what is safe to fix (originals are kept)."""
    from pancreas_cli.clean import clean as run_clean

    result = run_clean(_config(config, set_, wait=wait, wait_seconds=wait_seconds), check=check)
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
    wait: WaitOption = False,
    wait_seconds: WaitSecondsOption = None,
    json_: JsonOption = False,
) -> None:
    """Fingerprint, plan (ResEnc-M) and preprocess with nnU-Net, with its integrity check."""
    from pancreas_cli.preprocess import preprocess as run_preprocess

    result = run_preprocess(_config(config, set_, wait=wait, wait_seconds=wait_seconds), force=force, on_start=lambda: output.info(
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
    num_gpus: Annotated[int | None, typer.Option("--num-gpus", help="GPUs for nnU-Net's DDP training of each fold "
                                                 "(with --device cpu: CPU processes, for tests).")] = None,
    devices: Annotated[str | None, typer.Option("--devices", help="Train the folds side by side, one process per "
                                                "device, e.g. cuda:0,cuda:1.", metavar="DEV,DEV,...")] = None,
    trust_model: TrustModelOption = False,
    pretrained: Annotated[Path | None, typer.Option("--pretrained", help="Start from this model archive or checkpoint "
                                                    "(weights whose shapes match), e.g. to fine-tune.",
                                                    metavar="ZIP|PTH")] = None,
    wait: WaitOption = False,
    wait_seconds: WaitSecondsOption = None,
    json_: JsonOption = False,
) -> None:
    """Train the multi-task model (or stock nnU-Net) with nnU-Net v2's machinery."""
    from pancreas_cli.devices import device_list
    from pancreas_cli.progress import EpochPrinter
    from pancreas_cli.train import train as run_train
    from pancreas_cli.train import train_on_devices

    cfg = _config(config, set_, wait=wait, wait_seconds=wait_seconds, **{
        "train.device": device, "train.task": task, "train.epochs": epochs, "train.num_gpus": num_gpus})
    if "cpu" in (devices or cfg.train.device).split(","):
        output.warn("training on the CPU is very slow; use it for smoke runs only")
    folds = _folds(fold, cfg.dataset.num_folds)
    result = (train_on_devices(cfg, folds=folds, devices=device_list(devices), resume=resume, force=force,
                               trust_model=trust_model, pretrained=pretrained) if devices else
              run_train(cfg, folds=folds, resume=resume, force=force, reporter=EpochPrinter(quiet=output.verbosity < 0),
                        trust_model=trust_model, warn=output.warn, pretrained=pretrained))
    _print_training(result, json_)


def _print_training(result: Any, json_: bool) -> None:
    """The trained folds' table (or JSON); each fold that failed under --devices as an error, exit 1."""
    for done in result.folds:
        if done.up_to_date:
            output.info(f"fold {done.fold} up to date: trained to epoch {done.epochs_done} and validated")
        for line in done.pretrained.lines() if done.pretrained else []:
            output.info(f"fold {done.fold}: {line}")
    if json_:
        output.json(result.to_dict())
    else:
        rows = [(f.fold, f.epochs_done, f.last.get("dice_pancreas"), f.last.get("dice_lesion"),
                 f.last.get("val_macro_f1"), f"{f.seconds:.0f}s", str(f.output_folder)) for f in result.folds]
        output.table(f"{result.trainer} on {result.device}",
                     ["fold", "epochs", "dice pancreas", "dice lesion", "macro-F1", "time", "folder"], rows)
    for failure in result.failed:
        output.error(f"fold {failure.fold} on {failure.device}: {failure.error}")
    if result.failed:
        output.error(f"{count(len(result.failed), 'fold')} of {len(result.failed) + len(result.folds)} failed")
        raise typer.Exit(1)


def _model_flags(model: Path | None, checkpoint: str | None) -> tuple[dict[str, Any], Path | None]:
    """``--model``: the archive's model folder (unpacked, checked), and the task and checkpoint it holds."""
    if model is None:
        return {"predict.checkpoint": checkpoint}, None
    from pancreas_cli.modelzip import open_model

    opened = open_model(model)
    output.detail(f"model {opened.manifest['model']} (pancseg {opened.manifest['pancseg_version']}) in {opened.model_dir}")
    return {"train.task": opened.task, "predict.checkpoint": checkpoint or opened.checkpoint}, opened.model_dir


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
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write each case's class "
                                                     "probabilities (probabilities/CASE.nii.gz, 4D float32).")] = False,
    statistics: Annotated[bool, typer.Option("--statistics", help="Also write volumes, lesion diameter, HU and "
                                             "subtype per case (statistics/CASE.json, statistics.csv).")] = False,
    preview: Annotated[bool, typer.Option("--preview", help="Also draw three slices with the mask per case "
                                          "(preview/CASE.png, preview/index.html).")] = False,
    output_format: Annotated[str, typer.Option("--output-format", help="nifti, or dicom-seg: also a DICOM SEG of "
                                               "a DICOM series (dicom_seg/CASE.dcm).")] = "nifti",
    model: Annotated[Path | None, typer.Option("--model", help="A model archive (`pancseg export`) or installed model "
                                               "folder, instead of the project's model; no config needed.",
                                               metavar="ZIP|DIR")] = None,
    wait: WaitOption = False,
    wait_seconds: WaitSecondsOption = None,
    part: Annotated[str | None, typer.Option("--part", help="Predict only part I of N (I from 0), split by size: N "
                                             "such commands (terminals, a SLURM array) fill one -o.",
                                             metavar="I/N")] = None,
    num_parts: Annotated[int | None, typer.Option("--num-parts", help="With --part-id: --part ID/N (nnU-Net's "
                                                  "spelling).", metavar="N")] = None,
    part_id: Annotated[int | None, typer.Option("--part-id", metavar="I", help="See --num-parts.")] = None,
    devices: Annotated[str | None, typer.Option("--devices", help="One worker process per device, each a part, "
                                                "e.g. cuda:0,cuda:1 or cpu,cpu.", metavar="LIST")] = None,
    num_gpus: Annotated[int | None, typer.Option("--num-gpus", help="--devices cuda:0,...,cuda:N-1.",
                                                 metavar="N")] = None,
    json_: JsonOption = False,
) -> None:
    """Predict masks (labels 0/1/2) and lesion subtypes (subtype_results.csv) for new CT scans."""
    from pancreas_cli.outputs import OUTPUT_FORMATS, Outputs
    from pancreas_cli.predict import predict as run_predict
    from pancreas_cli.predict import predict_on_devices
    from pancreas_cli.progress import CasePrinter

    _check_choice(checkpoint, ("best", "final"), "--checkpoint")
    _check_choice(output_format, OUTPUT_FORMATS, "--output-format")
    chosen, workers = _predict_split(part, num_parts, part_id, devices, num_gpus, device)
    flags, model_dir = _model_flags(model, checkpoint)
    cfg = _config(config, set_, optional=model is not None, wait=wait, wait_seconds=wait_seconds,
                  **{"predict.device": device, **flags})
    options = {"input_path": input_, "out_dir": out, "folds": fold, "fast": fast, "overwrite": force, "series": series,
               "reporter": CasePrinter(quiet=output.verbosity < 0), "warn": output.warn, "trust_model": trust_model,
               "outputs": Outputs(save_probabilities, statistics, preview, output_format == "dicom-seg"),
               "model_dir": model_dir}
    result = (predict_on_devices(cfg, workers, **options) if workers else run_predict(cfg, part=chosen, **options))
    _print_prediction(result, json_)


def _check_choice(value: str | None, choices: tuple[str, ...], option: str) -> None:
    if value is not None and value not in choices:
        raise typer.BadParameter(f"must be {' or '.join(choices)}, got {value!r}", param_hint=option)


def _print_prediction(result: Any, json_: bool) -> None:
    """The outcome line (or JSON), the summaries' paths, and each failed case as an error (exit 1)."""
    if json_:
        output.json(result.to_dict())
    else:
        speed = result.cases_per_minute()
        output.result((f"part {result.part}: " if result.part else "") + f"{result.count('predicted')} predicted"
                      + (f" in {result.seconds:.1f}s ({speed:.1f} cases/min; the model loaded in "
                         f"{result.load_seconds:.1f}s before)" if speed else "")
                      + f", {result.count('skipped')} skipped (already done), "
                      f"{len(result.failed)} failed -> {result.out_dir}"
                      + (f"; subtypes: {result.subtype_csv}" if result.subtype_csv else ""))
        for name, path in result.summaries.items():
            output.result(f"{name}: {path}")
    for failure in result.failed:
        output.error(f"{failure.source}: {failure.error}")
    if result.failed:
        output.info(f"full errors: {result.log_file}")
        raise typer.Exit(1)


def _one_fold(value: str) -> int | None:
    """``--fold N`` of evaluate and report as a number, ``all`` as None."""
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"a fold number or 'all', got {value!r}", param_hint="--fold") from None


def _predict_split(part: str | None, num_parts: int | None, part_id: int | None, devices: str | None,
                   num_gpus: int | None, device: str | None) -> tuple[Any, list[str] | None]:
    """The part of ``--part`` or ``--num-parts``/``--part-id`` (None: every case), and the devices of
    ``--devices``/``--num-gpus`` (None: one process)."""
    from pancreas_cli.devices import device_list
    from pancreas_cli.parts import Part

    if part is not None and (num_parts is not None or part_id is not None):
        raise typer.BadParameter("give --part I/N or --num-parts N --part-id I, not both", param_hint="--part")
    if (num_parts is None) != (part_id is None):
        raise typer.BadParameter("--num-parts and --part-id go together", param_hint="--part-id")
    try:
        chosen = Part.parse(part) if part is not None else Part(part_id, num_parts) if num_parts is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--part") from None
    workers = device_list(devices, num_gpus)
    if workers is not None and (chosen is not None or device is not None):
        raise typer.BadParameter("--devices splits the cases into parts and sets each worker's device itself: "
                                 "drop --part and --device", param_hint="--devices")
    return chosen, workers


@app.command()
@handle_errors
def evaluate(
    pred: Annotated[Path | None, typer.Option("--pred", help="Folder of predicted masks (and subtype_results.csv).")] = None,
    gt: Annotated[Path | None, typer.Option("--gt", help="Folder of ground-truth masks.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[str | None, typer.Option("--fold", "-f", help="Instead of --pred/--gt: a trained fold's validation "
                                             "(N), or every fold pooled (all).", metavar="N|all")] = None,
    subtypes: Annotated[Path | None, typer.Option("--subtypes", help="True subtypes: CSV case_id,subtype or Names,Subtype.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Count missing predictions as empty.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the metrics (default: --pred, or the fold's folder).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace metrics of other inputs in the output folder.")] = False,
    json_: JsonOption = False,
) -> None:
    """Dice, IoU, NSD, HD95, volumes and subtype metrics, with bootstrap CIs and target pass/fail."""
    from pancreas_cli import evaluate as stage

    if fold is None:
        if pred is None or gt is None:
            raise typer.BadParameter("pass --pred and --gt, or --fold N|all", param_hint="--pred/--gt/--fold")
        result = stage.evaluate(_config(config, set_, optional=True), pred_dir=pred, gt_dir=gt, subtypes_csv=subtypes,
                                allow_missing=allow_missing, out_dir=out, force=force)
    elif pred or gt or subtypes or allow_missing:
        raise typer.BadParameter("--fold reads the fold's own predictions, ground truth and subtypes: leave out "
                                 "--pred, --gt, --subtypes and --allow-missing", param_hint="--fold")
    elif (number := _one_fold(fold)) is None:
        result = stage.evaluate_folds(_config(config, set_), out_dir=out, force=force)
    else:
        result = stage.evaluate_fold(_config(config, set_), number, out_dir=out, force=force)
    for note in result.notes:
        output.warn(note)
    if json_:
        output.json(result.summary)
        return
    if result.folds:
        output.table("cross-validation", list(result.folds[0]), [tuple(r.values()) for r in result.folds])
    output.table("evaluation", ["metric", "mean", "median", "95% CI", "target", "result"], _summary_rows(result.summary))
    output.result(f"{count(len(result.cases), 'case')}; per case: {result.per_case_csv}; summary: {result.summary_json}")


def _summary_rows(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    from pancreas_cli.evaluation import verdict

    rows: list[tuple[Any, ...]] = []
    targets = summary["targets"]
    for key, stats in summary["segmentation"].items():
        ci = "" if stats["ci95_low"] is None else f"{stats['ci95_low']:.3f}-{stats['ci95_high']:.3f}"
        target = targets.get(key)
        rows.append((key, stats["mean"], stats["median"], ci, target["target"] if target else "",
                     verdict(target)))
    cls = summary["classification"]
    if cls:
        target = targets["macro_f1"]
        rows.append(("macro_f1", cls["macro_f1"], "", "", target["target"], verdict(target)))
        rows.append(("accuracy", cls["accuracy"], "", "", "", ""))
    return rows


@app.command()
@handle_errors
def report(
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[str, typer.Option("--fold", "-f", help="Fold whose training curves (and, without --pred/--gt/"
                                      "--images, validation) to show; all: the cross-validation.",
                                      metavar="N|all")] = "0",
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
    result = run_report(_config(config, set_), fold=_one_fold(fold), out_html=out, pred_dir=pred, gt_dir=gt, images_dir=images,
                        metrics_dir=metrics)
    for note in result.notes:
        output.warn(note)
    if json_:
        output.json(result.to_dict())
        return
    for line in result.summary_lines:
        output.result(line)
    output.result(f"report: {result.html} ({len(result.pngs)} figures)")


@app.command()
@handle_errors
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="The model archive to write (.zip).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    fold: Annotated[list[int] | None, typer.Option("--fold", "-f", help="Fold(s) to include (default: all trained).",
                                                   metavar="N")] = None,
    checkpoint: Annotated[str, typer.Option(help="best or final.")] = "final",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write the trained model to one zip (plans, checkpoints, settings, version, checksums)."""
    from pancreas_cli.modelzip import export_model

    _check_choice(checkpoint, ("best", "final"), "--checkpoint")
    model, present = export_model(_config(config, set_), out, folds=fold, checkpoint=checkpoint, force=force)
    output.result(f"{'up to date' if present else 'exported'}: {model.manifest['model']} (folds "
                  f"{model.manifest['folds']}, {model.manifest['checkpoint']}) -> {out}")


@app.command("install-model")
@handle_errors
def install_model(
    archive: Annotated[Path, typer.Argument(help="A model archive written by `pancseg export`.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace another model in its place.")] = False,
) -> None:
    """Check a model archive and unpack it into the project's nnUNet_results."""
    from pancreas_cli.modelzip import install_model as run_install

    model, present = run_install(_config(config, set_), archive, force=force)
    output.result(f"{'already installed' if present else 'installed'}: {model.model_dir}; predict with "
                  f"`pancseg predict --model {model.model_dir} -i SCANS -o OUT`")


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
    wait: WaitOption = False,
    wait_seconds: WaitSecondsOption = None,
) -> None:
    """prepare -> clean -> preprocess -> train -> predict -> evaluate -> report, skipping what is up to date."""
    _run(_config(config, set_, check_source=True, wait=wait, wait_seconds=wait_seconds), fold, trust_model)


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
    """Console-script entry point (``python -m pancreas_cli`` too: completion scripts name ``pancseg``)."""
    app(prog_name="pancseg")


if __name__ == "__main__":
    main()
