"""``pancseg report``: one self-contained HTML page (figures embedded) plus the PNGs beside it.

Sections: training curves from ``metrics.csv``; the evaluation (summary with targets, per-case
distributions, confusion matrix) from ``pancseg evaluate``'s outputs; CT slice overlays of the best,
median and worst cases; and the run's provenance (config, versions, device, dates).
"""

from __future__ import annotations

import base64
import html
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_cli.config import Config, dump_config
from pancreas_cli.evaluation import PER_CASE_NAME, SUMMARY_NAME, load_per_case, load_summary, verdict
from pancreas_cli.exceptions import DataError, OutputExistsError
from pancreas_cli.figures import contour_labels, default_style, show_ct
from pancreas_cli.figures import save_figure as _save
from pancreas_cli.imageio import IMAGE_EXTENSIONS, read_image, sweep_dead_partials, write_text
from pancreas_cli.layout import (CROSSVAL_DIR, METRICS_NAME, VALIDATION_DIR, fold_folder, fold_validation,
                                  model_folder, validated_folds)
from pancreas_cli.multitask.history import REPORTED_COLUMNS, read_metrics
from pancreas_cli.subtypes import image_name

_TITLE = "<title>pancseg report: "  # how a report is recognised before it is replaced


@dataclass
class ReportResult:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    summary_lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"html": str(self.html.resolve()), "figures": [str(p.resolve()) for p in self.pngs],
                "summary": self.summary_lines, "notes": self.notes}


def _floats(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    """Column ``key`` of metrics.csv or metrics_per_case.csv rows (numbers; NaN where not measured)."""
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)


def training_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Losses, pseudo-Dice per structure, subtype F1/accuracy, learning rate and epoch time."""
    import matplotlib.pyplot as plt

    epochs = _floats(rows, "epoch")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    (loss_ax, dice_ax, cls_ax), (lr_ax, time_ax, crit_ax) = axes
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("seg_loss", "segmentation"),
                       ("cls_loss", "subtype"), ("val_cls_loss", "subtype (validation)")):
        values = _floats(rows, key)
        if not np.isnan(values).all():
            loss_ax.plot(epochs, values, label=label)
    loss_ax.set_title("losses")
    for key, label in (("dice_pancreas", "whole pancreas"), ("dice_lesion", "lesion"),
                       ("ema_pseudo_dice", "nnU-Net EMA")):
        dice_ax.plot(epochs, _floats(rows, key), label=label)
    dice_ax.set_title("validation pseudo-Dice")
    dice_ax.set_ylim(0, 1)
    if not np.isnan(_floats(rows, "val_macro_f1")).all():
        cls_ax.plot(epochs, _floats(rows, "val_macro_f1"), label="macro-F1")
        cls_ax.plot(epochs, _floats(rows, "val_accuracy"), label="accuracy")
        cls_ax.set_ylim(0, 1)
    cls_ax.set_title("subtype (validation, case level)")
    lr_ax.plot(epochs, _floats(rows, "lr"))
    lr_ax.set_title("learning rate")
    time_ax.plot(epochs, _floats(rows, "epoch_time_s"))
    time_ax.set_title("epoch time (s)")
    crit_ax.plot(epochs, _floats(rows, "criterion"), label="selection criterion")
    best = np.array([r.get("best") == 1 for r in rows], dtype=bool)
    crit_ax.plot(epochs[best], _floats(rows, "criterion")[best], "o", label="new best")
    crit_ax.set_title("checkpoint selection")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def distribution_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per-case metric distributions (box plots with the cases as points)."""
    import matplotlib.pyplot as plt

    overlap = ["dice_pancreas", "nsd_pancreas", "dice_lesion", "nsd_lesion"]
    distance = ["hd95_pancreas", "hd95_lesion"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for ax, keys, title in ((ax1, overlap, "overlap (higher is better)"), (ax2, distance, "HD95 in mm (lower is better)")):
        data = [_floats(rows, k)[~np.isnan(_floats(rows, k))] for k in keys]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(keys) + 1), keys, rotation=15)
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.plot(i + rng.uniform(-0.12, 0.12, len(values)), values, "o", alpha=0.6, markersize=4)
        ax.set_title(title)
    ax1.set_ylim(-0.02, 1.02)
    return _save(fig, path)


def confusion_figure(matrix: list[list[int]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    array = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(array, cmap="Blues")
    for (i, j), value in np.ndenumerate(array):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > array.max() / 2 else "black")
    ax.set_xticks(range(len(array)))
    ax.set_yticks(range(len(array)))
    ax.set_xlabel("predicted subtype")
    ax.set_ylabel("true subtype")
    ax.set_title("subtype confusion matrix")
    return _save(fig, path)


def _find_image(folder: Path, case: str) -> Path | None:
    for stem in (image_name(case, extension=""), case):  # the CT's own name first
        for ext in IMAGE_EXTENSIONS:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    return None


@dataclass
class OverlaySlice:
    """One case's axial slice for the overlays: CT, ground truth and prediction (labels 0/1/2)."""

    title: str
    case: str
    z: int
    ct: np.ndarray
    gt: np.ndarray
    pred: np.ndarray


def overlay_slice(title: str, case: str, paths: tuple[Path, Path, Path], config: Config) -> OverlaySlice:
    """The slice with the most ground-truth pancreas (or prediction, when the ground truth is empty).

    ``paths``: CT, ground truth, prediction. Each is read to its end, the masks' labels are checked as
    evaluate checks them, and all three must lie on one grid: a CT of another size would end in an
    IndexError or, with the same number of slices, draw the contours on the wrong anatomy.
    """
    import SimpleITK as sitk

    from pancreas_cli.metrics import as_labels, check_same_grid, read_label_image

    ct_path, gt_path, pred_path = paths
    ct_image = read_image(ct_path, verify=True)
    gt_image, pred_image = read_label_image(gt_path), read_label_image(pred_path)
    check_same_grid(ct_image, gt_image, f"CT {ct_path} and ground truth {gt_path}",
                    "; pass as --images the CT scans these masks belong to")
    check_same_grid(pred_image, gt_image, f"prediction {pred_path} and ground truth {gt_path}",
                    "; pass the --pred and --gt folders that were evaluated together")
    tolerance = config.clean.label_tolerance
    gt = as_labels(sitk.GetArrayFromImage(gt_image), gt_path, config.evaluate, tolerance)
    pred = as_labels(sitk.GetArrayFromImage(pred_image), pred_path, config.evaluate, tolerance)
    area = (gt > 0).sum(axis=(1, 2)) if (gt > 0).any() else (pred > 0).sum(axis=(1, 2))
    z = int(np.argmax(area))
    ct = sitk.GetArrayFromImage(ct_image)[z].astype(np.float32)
    return OverlaySlice(title, case, z, ct, gt[z], pred[z])


def overlay_figure(cases: list[OverlaySlice], path: Path) -> Path:
    """Axial CT slices with ground-truth (green) and predicted (red) contours; lesion dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        show_ct(ax, case.ct)
        for mask, color in ((case.gt, "lime"), (case.pred, "red")):
            contour_labels(ax, mask, color)
        ax.set_title(f"{case.title}: {case.case} (slice {case.z})")
    fig.text(0.5, 0.01, "green: ground truth, red: prediction; solid: pancreas, dashed: lesion", ha="center")
    return _save(fig, path)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("pancseg", "nnunetv2", "torch", "SimpleITK", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body += f"<tr{cls}>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0} th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
tr.pass td{background:#e8f6e8} tr.fail td{background:#fbe9e9}
figure{margin:1rem 0} img{max-width:100%;border:1px solid #eee} figcaption{color:#666;font-size:.9rem}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.85rem} .note{color:#8a6d00}
"""

# Marks the page once every image has loaded, so a headless browser can check the page.
_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""


def report(
    config: Config,
    *,
    fold: int | None = 0,
    out_html: Path | None = None,
    pred_dir: Path | None = None,
    gt_dir: Path | None = None,
    images_dir: Path | None = None,
    metrics_dir: Path | None = None,
) -> ReportResult:
    """Write the HTML report and its PNGs; sections without their inputs say what to run.

    The evaluation is read from ``metrics_dir`` (where ``pancseg evaluate -o`` wrote it), by default
    ``pred_dir`` (where it writes without ``-o``). Without prediction, ground-truth and CT folders, the
    report is the fold's own: its validation (as ``pancseg evaluate --fold`` evaluates it), its ground
    truth and CT. ``fold`` None: the cross-validation, every validated fold's curves and the pooled
    evaluation of ``pancseg evaluate --fold all``.
    """
    folds = [fold] if fold is not None else validated_folds(model_folder(config))
    if not folds:
        raise DataError(f"{model_folder(config)}: no fold has finished training with its validation; run "
                        "`pancseg train` first")
    pred_dirs = [pred_dir] if pred_dir else []
    if pred_dir is gt_dir is images_dir is None:
        pred_dirs, gt_dir, images_dir = _fold_inputs(config, folds)
    if fold is None:
        metrics_dir = metrics_dir or model_folder(config) / CROSSVAL_DIR
    name = "crossval" if fold is None else f"fold{fold}"
    with default_style():  # not the style nnU-Net's progress plot left in this process
        return _write_report(config, folds, "cross-validation" if fold is None else f"fold {fold}",
                             out_html or config.project_dir / "report" / f"report_{name}.html", pred_dirs, gt_dir,
                             images_dir, metrics_dir or next(iter(pred_dirs), None))


def _fold_inputs(config: Config, folds: list[int]) -> tuple[list[Path], Path | None, Path | None]:
    """The folds' validation masks, ground truth and CT; nothing while a fold is not validated."""
    if not all((fold_folder(model_folder(config), f) / VALIDATION_DIR).is_dir() for f in folds):
        return [], None, None
    validations = [fold_validation(config, f) for f in folds]
    return [v.pred_dir for v in validations], validations[0].gt_dir, validations[0].images_dir


@dataclass
class _Inputs:
    """Everything the report reads, read and checked before anything is drawn or written."""

    fold_dirs: dict[int, Path]
    training: dict[int, list[dict[str, float | int | None]]]
    metrics_dir: Path | None
    summary: dict[str, Any] | None = None
    per_case: list[dict[str, Any]] = field(default_factory=list)
    overlays: list[OverlaySlice] = field(default_factory=list)


def _read_inputs(config: Config, folds: list[int], pred_dirs: list[Path], gt_dir: Path | None,
                 images_dir: Path | None, metrics_dir: Path | None) -> _Inputs:
    fold_dirs = {f: fold_folder(model_folder(config), f) for f in folds}
    training = {f: read_metrics(d / METRICS_NAME, required=REPORTED_COLUMNS) for f, d in fold_dirs.items()}
    inputs = _Inputs(fold_dirs, training, metrics_dir)
    summary_json = metrics_dir / SUMMARY_NAME if metrics_dir else None
    per_case_csv = metrics_dir / PER_CASE_NAME if metrics_dir else None
    if not (summary_json and summary_json.is_file() and per_case_csv and per_case_csv.is_file()):
        return inputs
    inputs.summary = load_summary(summary_json)
    inputs.per_case = load_per_case(per_case_csv, summary_json, inputs.summary["cases"])
    # Overlays: best, median and worst by whole-pancreas Dice; each case once (with two cases the
    # median is the best one).
    ranked = sorted(inputs.per_case, key=lambda r: r["dice_pancreas"])
    picks = {0: "worst", len(ranked) // 2: "median", len(ranked) - 1: "best"} if ranked else {}
    for index, title in sorted(picks.items()):
        row = ranked[index]
        case = row["case"]
        paths = [_find_image(folder, case) if folder else None for folder in (images_dir, gt_dir)]
        paths.append(next(filter(None, (_find_image(folder, case) for folder in pred_dirs)), None))
        if all(paths):
            inputs.overlays.append(overlay_slice(f"{title} (Dice {row['dice_pancreas']:.3f})", case,
                                                 tuple(paths), config))  # type: ignore[arg-type]
    return inputs


def _training_section(inputs: _Inputs, png_stem: Path, result: ReportResult) -> list[str]:
    """Each fold's curves (``STEM_training.png``; with several folds ``STEM_training_foldN.png``)."""
    several = len(inputs.training) > 1
    return [part for fold, rows in inputs.training.items() for part in _fold_training(
        rows, inputs.fold_dirs[fold], fold, png_stem.with_name(f"{png_stem.name}_training"
                                                               + (f"_fold{fold}.png" if several else ".png")),
        result, f"fold {fold} training" if several else "training")]


def _fold_training(rows: list[dict[str, Any]], fold_dir: Path, fold: int, png: Path, result: ReportResult,
                   label: str) -> list[str]:
    if not rows:
        result.notes.append(f"no training metrics for fold {fold}")
        return [f"<p class='note'>No metrics.csv in {html.escape(str(fold_dir))}: run "
                f"<code>pancseg train --fold {fold}</code>.</p>"]
    result.pngs.append(training_figure(rows, png))
    last = {key: "-" if value is None else f"{value:.6g}" for key, value in rows[-1].items()}  # as written
    result.summary_lines.append(
        f"{label}: {len(rows)} epochs; last validation pseudo-Dice pancreas {last['dice_pancreas']}, "
        f"lesion {last['dice_lesion']}, macro-F1 {last.get('val_macro_f1', '-')}")
    return [f"<p>{len(rows)} epochs of fold {fold} in <code>{html.escape(str(fold_dir))}</code>.</p>",
            _img_tag(png, "training curves")]


_VERDICT_CLASS = {"pass": "pass", "FAIL": "fail"}  # the table cell's CSS class


def _summary_table(summary: dict[str, Any]) -> str:
    rows, classes = [], []
    for key, stats in summary["segmentation"].items():
        target = summary["targets"].get(key)
        ci = "-" if stats["ci95_low"] is None else f"{stats['ci95_low']:.3f} - {stats['ci95_high']:.3f}"
        passed = verdict(target)
        rows.append([key, stats["mean"], stats["median"], ci, target["target"] if target else None, passed or None])
        classes.append(_VERDICT_CLASS.get(passed, ""))
    cls = summary.get("classification")
    if cls:
        target = summary["targets"]["macro_f1"]
        rows.append(["macro_f1 (subtype)", cls["macro_f1"], None, "-", target["target"], verdict(target)])
        classes.append(_VERDICT_CLASS.get(verdict(target), ""))
        rows.append(["accuracy (subtype)", cls["accuracy"], None, "-", None, None])
        classes.append("")
    return _table(["metric", "mean", "median", "95% CI (bootstrap)", "target", "result"], rows, classes)


def _evaluation_section(inputs: _Inputs, png_stem: Path, result: ReportResult) -> list[str]:
    summary, metrics_dir = inputs.summary, inputs.metrics_dir
    if summary is None:
        where = str(metrics_dir) if metrics_dir else "(no --pred or --metrics folder)"
        result.notes.append(f"no evaluation ({SUMMARY_NAME}, {PER_CASE_NAME}) in {where}; run pancseg "
                            "evaluate (--fold N for a fold's validation), or pass --metrics DIR where "
                            "`pancseg evaluate -o DIR` wrote them")
        return [f"<p class='note'>No evaluation in {html.escape(where)}: run <code>pancseg predict</code> "
                "and <code>pancseg evaluate</code> (pass <code>--metrics</code> where its -o wrote).</p>"]
    parts = [f"<p>{summary['cases']} cases evaluated in <code>{html.escape(str(metrics_dir))}</code> "
             f"(NSD: {summary['nsd_definition']}).</p>", _summary_table(summary)]
    if isinstance(summary.get("folds"), list) and summary["folds"]:  # pancseg evaluate --fold all
        rows = summary["folds"]
        parts += ["<h3>Cross-validation</h3>", _table(list(rows[0]), [list(r.values()) for r in rows])]
    png = distribution_figure(inputs.per_case, png_stem.with_name(f"{png_stem.name}_distributions.png"))
    result.pngs.append(png)
    parts.append(_img_tag(png, "per-case metric distributions"))
    cls = summary.get("classification")
    if cls:
        png = confusion_figure(cls["confusion_matrix"], png_stem.with_name(f"{png_stem.name}_confusion.png"))
        result.pngs.append(png)
        parts.append(_img_tag(png, "subtype confusion matrix"))
        per_class = [[c, cls["precision"][c], cls["recall"][c], cls["f1"][c]] for c in sorted(cls["f1"])]
        parts.append(_table(["subtype", "precision", "recall", "F1"], per_class))
    for key, t in summary["targets"].items():
        if t["value"] is not None:
            result.summary_lines.append(f"{key}: {t['value']:.4f} (target {t['target']}: "
                                        f"{verdict(t)})")
    parts.append("<h2 id='overlays'>Examples</h2>")
    if inputs.overlays:
        png = overlay_figure(inputs.overlays, png_stem.with_name(f"{png_stem.name}_overlays.png"))
        result.pngs.append(png)
        parts.append(_img_tag(png, "best, median and worst cases by whole-pancreas Dice"))
    else:
        parts.append("<p class='note'>No overlays: pass --images (CT) and --gt folders with the cases.</p>")
        result.notes.append("no overlays: CT or ground-truth folder missing")
    return parts


def _provenance_section(config: Config, fold_dir: Path, now: str, result: ReportResult) -> list[str]:
    device = "-"
    debug = fold_dir / "debug.json"
    if debug.is_file():  # nnU-Net's record of the training run: only the device is shown from it
        try:
            device = str(json.loads(debug.read_text(encoding="utf-8")).get("device", "-"))
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            result.notes.append(f"{debug}: unreadable ({type(exc).__name__}); the training device is not "
                                "shown")
    dates = [["report written", now]]
    metrics_csv = fold_dir / METRICS_NAME
    if metrics_csv.is_file():
        dates.append(["training last updated", datetime.fromtimestamp(metrics_csv.stat().st_mtime, timezone.utc)
                      .strftime("%Y-%m-%d %H:%M UTC")])
    rows = [[k, v] for k, v in _versions().items()] + [["training device", device]] + dates
    return ["<h2 id='provenance'>Provenance</h2>", _table(["item", "value"], rows),
            f"<p>Config: {html.escape(str(config.config_path or 'defaults'))}</p>"
            f"<pre>{html.escape(dump_config(config))}</pre>"]


def _write_report(config: Config, folds: list[int], title: str, out_html: Path, pred_dirs: list[Path],
                  gt_dir: Path | None, images_dir: Path | None, metrics_dir: Path | None) -> ReportResult:
    if out_html.is_file() and _TITLE not in out_html.read_text(encoding="utf-8", errors="replace")[:2000]:
        raise OutputExistsError(f"{out_html} exists and is not a pancseg report; choose another --out or move it")
    inputs = _read_inputs(config, folds, pred_dirs, gt_dir, images_dir, metrics_dir)
    png_stem = out_html.parent / out_html.stem
    sweep_dead_partials(out_html.parent)  # what a killed report left
    result = ReportResult(out_html)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<h2 id='training'>Training</h2>",
             *_training_section(inputs, png_stem, result),
             "<h2 id='evaluation'>Evaluation</h2>", *_evaluation_section(inputs, png_stem, result),
             *_provenance_section(config, inputs.fold_dirs[folds[0]], now, result)]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{_TITLE}"
            f"{html.escape(config.dataset.folder_name)} {title}</title><style>{_STYLE}</style></head><body>"
            f"<h1>pancseg report</h1><p>{html.escape(config.dataset.folder_name)}, {title}, "
            f"{html.escape(config.train.task)} ({html.escape(config.plan.configuration)}), {now}</p>"
            + "".join(parts) + _SCRIPT + "</body></html>")
    write_text(page, out_html)
    return result


def require_folder(path: Path | None, what: str) -> None:
    if path is not None and not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
