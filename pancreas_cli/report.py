"""``pancseg report``: one self-contained HTML page (figures embedded) plus the PNGs beside it.

Sections: training curves from ``metrics.csv``; the evaluation (summary with targets, per-case
distributions, confusion matrix) from ``pancseg evaluate``'s outputs; CT slice overlays of the best,
median and worst cases; and the run's provenance (config, versions, device, dates).
"""

from __future__ import annotations

import base64
import csv
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
from pancreas_cli.evaluate import PER_CASE_NAME, SUMMARY_NAME
from pancreas_cli.exceptions import DataError, OutputExistsError
from pancreas_cli.imageio import IMAGE_EXTENSIONS, atomic_target, publish, read_image, write_text

CT_WINDOW = (-150.0, 250.0)  # abdominal soft-tissue window (HU)
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


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _floats(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            publish(tmp, path)
    finally:
        plt.close(fig)
    return path


def training_figure(rows: list[dict[str, str]], path: Path) -> Path:
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
    best = [e for e, r in zip(epochs, rows) if r.get("best") == "1"]
    crit_ax.plot(best, [float(r["criterion"]) for r in rows if r.get("best") == "1"], "o", label="new best")
    crit_ax.set_title("checkpoint selection")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def distribution_figure(rows: list[dict[str, str]], path: Path) -> Path:
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
    for name in (f"{case}_0000", case):
        for ext in IMAGE_EXTENSIONS:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def overlay_figure(cases: list[tuple[str, str, Path, Path, Path]], path: Path) -> Path:
    """Axial CT slices with ground-truth (green) and predicted (red) contours; lesion dashed.

    ``cases``: (title, case id, CT, ground truth, prediction). The slice is the one with the most
    ground-truth pancreas (or prediction, when the ground truth is empty).
    """
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 5), squeeze=False)
    for ax, (title, case, ct_path, gt_path, pred_path) in zip(axes[0], cases):
        ct = sitk.GetArrayFromImage(read_image(ct_path)).astype(np.float32)
        gt = np.rint(sitk.GetArrayFromImage(read_image(gt_path))).astype(np.int16)
        pred = sitk.GetArrayFromImage(read_image(pred_path)).astype(np.int16)
        area = (gt > 0).sum(axis=(1, 2)) if (gt > 0).any() else (pred > 0).sum(axis=(1, 2))
        z = int(np.argmax(area))
        ax.imshow(np.clip(ct[z], *CT_WINDOW), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])
        for mask, color in ((gt, "lime"), (pred, "red")):
            for structure, style in (((mask[z] > 0), "solid"), ((mask[z] == 2), "dashed")):
                if structure.any():
                    ax.contour(structure.astype(float), levels=[0.5], colors=color, linestyles=style, linewidths=1.2)
        ax.set_title(f"{title}: {case} (slice {z})")
        ax.axis("off")
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
    fold: int = 0,
    out_html: Path | None = None,
    pred_dir: Path | None = None,
    gt_dir: Path | None = None,
    images_dir: Path | None = None,
    metrics_dir: Path | None = None,
) -> ReportResult:
    """Write the HTML report and its PNGs; sections without their inputs say what to run.

    The evaluation is read from ``metrics_dir`` (where ``pancseg evaluate -o`` wrote it), by default
    ``pred_dir`` (where it writes without ``-o``).
    """
    import matplotlib

    matplotlib.use("Agg")
    # nnU-Net's progress plot changes matplotlib's global style (seaborn, font scale 2.5) in this
    # process: draw with the defaults.
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        return _write_report(config, fold, out_html, pred_dir, gt_dir, images_dir, metrics_dir or pred_dir)


def _write_report(config: Config, fold: int, out_html: Path | None, pred_dir: Path | None, gt_dir: Path | None,
                  images_dir: Path | None, metrics_dir: Path | None) -> ReportResult:
    from pancreas_cli.predict import model_folder

    out_html = out_html or config.project_dir / "report" / f"report_fold{fold}.html"
    if out_html.is_file() and _TITLE not in out_html.read_text(encoding="utf-8", errors="replace")[:2000]:
        raise OutputExistsError(f"{out_html} exists and is not a pancseg report; choose another --out or move it")
    png_dir = out_html.parent
    stem = out_html.stem
    result = ReportResult(out_html)
    parts: list[str] = []
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    # Training
    fold_dir = model_folder(config) / f"fold_{fold}"
    metrics_csv = fold_dir / "metrics.csv"
    parts.append("<h2 id='training'>Training</h2>")
    if metrics_csv.is_file() and (rows := _read_csv(metrics_csv)):
        png = training_figure(rows, png_dir / f"{stem}_training.png")
        result.pngs.append(png)
        last = rows[-1]
        parts.append(f"<p>{len(rows)} epochs of fold {fold} in <code>{html.escape(str(fold_dir))}</code>.</p>")
        parts.append(_img_tag(png, "training curves"))
        result.summary_lines.append(
            f"training: {len(rows)} epochs; last validation pseudo-Dice pancreas {last['dice_pancreas'] or '-'}, "
            f"lesion {last['dice_lesion'] or '-'}, macro-F1 {last.get('val_macro_f1') or '-'}")
    else:
        parts.append(f"<p class='note'>No metrics.csv in {html.escape(str(fold_dir))}: run <code>pancseg train --fold {fold}</code>.</p>")
        result.notes.append(f"no training metrics for fold {fold}")

    # Evaluation
    parts.append("<h2 id='evaluation'>Evaluation</h2>")
    summary_json = metrics_dir / SUMMARY_NAME if metrics_dir else None
    per_case_csv = metrics_dir / PER_CASE_NAME if metrics_dir else None
    if summary_json and summary_json.is_file() and per_case_csv and per_case_csv.is_file():
        summary = json.loads(summary_json.read_text(encoding="utf-8"))
        per_case = _read_csv(per_case_csv)
        rows_, classes = [], []
        for key, stats in summary["segmentation"].items():
            target = summary["targets"].get(key)
            ci = "-" if stats["ci95_low"] is None else f"{stats['ci95_low']:.3f} - {stats['ci95_high']:.3f}"
            passed = None if not target or target["passed"] is None else ("pass" if target["passed"] else "FAIL")
            rows_.append([key, stats["mean"], stats["median"], ci, target["target"] if target else None, passed])
            classes.append("" if passed is None else ("pass" if passed == "pass" else "fail"))
        cls = summary.get("classification")
        if cls:
            target = summary["targets"]["macro_f1"]
            rows_.append(["macro_f1 (subtype)", cls["macro_f1"], None, "-", target["target"],
                          "pass" if target["passed"] else "FAIL"])
            classes.append("pass" if target["passed"] else "fail")
            rows_.append(["accuracy (subtype)", cls["accuracy"], None, "-", None, None])
            classes.append("")
        parts.append(f"<p>{summary['cases']} cases evaluated in <code>{html.escape(str(metrics_dir))}</code> "
                     f"(NSD: {summary['nsd_definition']}).</p>")
        parts.append(_table(["metric", "mean", "median", "95% CI (bootstrap)", "target", "result"], rows_, classes))
        png = distribution_figure(per_case, png_dir / f"{stem}_distributions.png")
        result.pngs.append(png)
        parts.append(_img_tag(png, "per-case metric distributions"))
        if cls:
            png = confusion_figure(cls["confusion_matrix"], png_dir / f"{stem}_confusion.png")
            result.pngs.append(png)
            parts.append(_img_tag(png, "subtype confusion matrix"))
            per_class = [[c, cls["precision"][c], cls["recall"][c], cls["f1"][c]] for c in sorted(cls["f1"])]
            parts.append(_table(["subtype", "precision", "recall", "F1"], per_class))
        for key, t in summary["targets"].items():
            if t["value"] is not None:
                result.summary_lines.append(f"{key}: {t['value']:.4f} (target {t['target']}: "
                                            f"{'pass' if t['passed'] else 'FAIL'})")

        # Overlays: best, median and worst by whole-pancreas Dice.
        parts.append("<h2 id='overlays'>Examples</h2>")
        ranked = sorted(per_case, key=lambda r: float(r["dice_pancreas"]))
        # Each case once: with two cases the median is the best one.
        picks = {0: "worst", len(ranked) // 2: "median", len(ranked) - 1: "best"}
        chosen = []
        for index, title in sorted(picks.items()):
            case = ranked[index]["case"]
            row = ranked[index]
            ct = _find_image(images_dir, case) if images_dir else None
            gt = _find_image(gt_dir, case) if gt_dir else None
            pred = _find_image(pred_dir, case) if pred_dir else None
            if ct and gt and pred:
                chosen.append((f"{title} (Dice {float(row['dice_pancreas']):.3f})", case, ct, gt, pred))
        if chosen:
            png = overlay_figure(chosen, png_dir / f"{stem}_overlays.png")
            result.pngs.append(png)
            parts.append(_img_tag(png, "best, median and worst cases by whole-pancreas Dice"))
        else:
            parts.append("<p class='note'>No overlays: pass --images (CT) and --gt folders with the cases.</p>")
            result.notes.append("no overlays: CT or ground-truth folder missing")
    else:
        where = str(metrics_dir) if metrics_dir else "(no --pred or --metrics folder)"
        parts.append(f"<p class='note'>No evaluation in {html.escape(where)}: run <code>pancseg predict</code> "
                     "and <code>pancseg evaluate</code> (pass <code>--metrics</code> where its -o wrote).</p>")
        result.notes.append(f"no evaluation ({SUMMARY_NAME}, {PER_CASE_NAME}) in {where}; run pancseg "
                            "evaluate, or pass --metrics DIR where `pancseg evaluate -o DIR` wrote them")

    # Provenance
    parts.append("<h2 id='provenance'>Provenance</h2>")
    versions = _versions()
    device = "-"
    debug = fold_dir / "debug.json"
    if debug.is_file():
        device = json.loads(debug.read_text(encoding="utf-8")).get("device", "-")
    dates = [["report written", now]]
    if metrics_csv.is_file():
        dates.append(["training last updated", datetime.fromtimestamp(metrics_csv.stat().st_mtime, timezone.utc)
                      .strftime("%Y-%m-%d %H:%M UTC")])
    parts.append(_table(["item", "value"], [[k, v] for k, v in versions.items()] + [["training device", device]] + dates))
    parts.append(f"<p>Config: {html.escape(str(config.config_path or 'defaults'))}</p><pre>{html.escape(dump_config(config))}</pre>")

    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{_TITLE}"
            f"{html.escape(config.dataset.folder_name)} fold {fold}</title><style>{_STYLE}</style></head><body>"
            f"<h1>pancseg report</h1><p>{html.escape(config.dataset.folder_name)}, fold {fold}, "
            f"{html.escape(config.train.task)} ({html.escape(config.plan.configuration)}), {now}</p>"
            + "".join(parts) + _SCRIPT + "</body></html>")
    write_text(page, out_html)
    return result


def require_folder(path: Path | None, what: str) -> None:
    if path is not None and not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
