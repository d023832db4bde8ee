"""The results table (markdown + JSON) and the sample figure (rows: methods; columns: digits 0-9)."""

import json
from pathlib import Path

import numpy as np

# Issue #6: a 1-step YOSO row meets the goal when it beats every base row (1, 2, 4 steps, both samplers) on
# accuracy and on Fréchet distance, its Fréchet distance is within 1.5x the teacher's, and its diversity is
# within 20% of the teacher's.
FRECHET_FACTOR = 1.5
DIVERSITY_TOLERANCE = 0.2

# Issue #11: the 1-step EMA row, with or without IPI, matches the teacher: Fréchet distance at most 1.05x the
# teacher's, accuracy within 1 percentage point of the teacher's, diversity within 15% of the teacher's.
TEACHER_MATCH_ROWS = ("yoso_ema_1", "yoso_ema_1_ipi")
TEACHER_FRECHET_FACTOR = 1.05
TEACHER_ACCURACY_POINTS = 1.0
TEACHER_DIVERSITY_TOLERANCE = 0.15
EPS = 1e-9  # a value on a bound (up to float rounding) meets it

# Issue #14: the real-data 1-step EMA row has a lower Fréchet distance than the teacher and than every base row.
# The goal is the plain row's; the IPI row is reported beside it.
REAL_DATA_GOAL_ROW = "real_data_1"
REAL_DATA_ROWS = ("real_data_1", "real_data_1_ipi")


def goal_check(rows):
    """For each 1-step YOSO-LoRA row (not the ablations): the goal's four criteria, measured."""
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    base, teacher = by_group.get("base", []), (by_group.get("teacher") or [None])[0]
    checks = []
    if not base or teacher is None:
        return checks
    best_base_acc = max(r["accuracy"] for r in base)
    best_base_fd = min(r["frechet"] for r in base)
    for r in by_group.get("yoso", []):
        if r["steps"] != 1:
            continue
        checks.append({
            "row": r["name"],
            "label": r["label"],
            "base_rows_not_beaten_accuracy": [b["label"] for b in base if not r["accuracy"] > b["accuracy"]],
            "base_rows_not_beaten_frechet": [b["label"] for b in base if not r["frechet"] < b["frechet"]],
            "beats_base_accuracy": r["accuracy"] > best_base_acc,
            "ties_base_accuracy": r["accuracy"] == best_base_acc,
            "beats_base_frechet": r["frechet"] < best_base_fd,
            "frechet_over_teacher": r["frechet"] / teacher["frechet"] if teacher["frechet"] > 0 else float("inf"),
            "frechet_within_1.5x_teacher": r["frechet"] <= FRECHET_FACTOR * teacher["frechet"],
            "diversity_over_teacher": r["diversity"] / teacher["diversity"] if teacher["diversity"] > 0 else float("inf"),
            "diversity_within_20pct_teacher": abs(r["diversity"] - teacher["diversity"]) <= DIVERSITY_TOLERANCE * teacher["diversity"],
            "best_base_accuracy": best_base_acc,
            "best_base_frechet": best_base_fd,
            "n_base_rows": len(base),
        })
    for c in checks:
        c["all_met"] = all(c[k] for k in ("beats_base_accuracy", "beats_base_frechet", "frechet_within_1.5x_teacher",
                                          "diversity_within_20pct_teacher"))
    return checks


def _teacher_and_base(rows):
    base = [r for r in rows if r["group"] == "base"]
    teacher = next((r for r in rows if r["group"] == "teacher"), None)
    return base, teacher


def teacher_match_check(rows):
    """Issue #11's criteria for each of ``TEACHER_MATCH_ROWS`` present; the goal is met when one row meets all
    three. Returns ``{"rows": [...], "met": bool}`` (``rows`` empty without a teacher row)."""
    _, teacher = _teacher_and_base(rows)
    checks = []
    for r in rows:
        if teacher is None or r["name"] not in TEACHER_MATCH_ROWS:
            continue
        fd_ratio = r["frechet"] / teacher["frechet"] if teacher["frechet"] > 0 else float("inf")
        div_ratio = r["diversity"] / teacher["diversity"] if teacher["diversity"] > 0 else float("inf")
        gap = 100.0 * (r["accuracy"] - teacher["accuracy"])
        c = {
            "row": r["name"], "label": r["label"],
            "frechet_over_teacher": fd_ratio,
            "frechet_met": fd_ratio <= TEACHER_FRECHET_FACTOR + EPS,
            "accuracy_minus_teacher_points": gap,
            "accuracy_met": abs(gap) <= TEACHER_ACCURACY_POINTS + EPS,
            "diversity_over_teacher": div_ratio,
            "diversity_met": abs(div_ratio - 1.0) <= TEACHER_DIVERSITY_TOLERANCE + EPS,
        }
        c["all_met"] = c["frechet_met"] and c["accuracy_met"] and c["diversity_met"]
        checks.append(c)
    return {"rows": checks, "met": any(c["all_met"] for c in checks)}


def real_data_check(rows):
    """Issue #14's criteria for the real-data 1-step rows present: Fréchet distance below the teacher's and below
    every base row's. ``met`` is the goal row's (``REAL_DATA_GOAL_ROW``) verdict."""
    base, teacher = _teacher_and_base(rows)
    checks = []
    for r in rows:
        if teacher is None or not base or r["name"] not in REAL_DATA_ROWS:
            continue
        best = min(base, key=lambda b: b["frechet"])
        c = {
            "row": r["name"], "label": r["label"], "frechet": r["frechet"],
            "teacher_frechet": teacher["frechet"], "below_teacher": r["frechet"] < teacher["frechet"],
            "best_base_frechet": best["frechet"], "best_base_row": best["label"],
            "base_rows_not_beaten": [b["label"] for b in base if not r["frechet"] < b["frechet"]],
            "n_base_rows": len(base),
        }
        c["below_every_base"] = not c["base_rows_not_beaten"]
        c["all_met"] = c["below_teacher"] and c["below_every_base"]
        checks.append(c)
    goal = next((c for c in checks if c["row"] == REAL_DATA_GOAL_ROW), None)
    return {"rows": checks, "met": bool(goal and goal["all_met"])}


def goals(rows):
    """Every goal check, by name."""
    return {"beats_base": goal_check(rows), "matches_teacher": teacher_match_check(rows), "real_data_beats_teacher": real_data_check(rows)}


def _yes(flag):
    return "yes" if flag else "**no**"


def _mark(flag):
    return "(met)" if flag else "(**not met**)"


def _verdict(check, metric):
    missed = check[f"base_rows_not_beaten_{metric}"]
    n = check["n_base_rows"]
    if not missed:
        return "yes"
    tie = ", ties the best" if metric == "accuracy" and check["ties_base_accuracy"] else ""
    if len(missed) == n:
        return f"**no**: beats none of {n}{tie}"
    return f"**no**: beats {n - len(missed)} of {n}, not " + "; ".join(missed)


def markdown_table(rows, classifier_info, command, extra=None, n_boot=25):
    lines = [
        "| Row | Steps | Guidance | Accuracy | Fréchet distance (± bootstrap sd) | Diversity | Sampling s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ref = r["group"] == "reference"
        steps = "" if ref else str(r["steps"])
        guidance = "" if ref else f"{r['guidance']:g}"
        seconds = "" if ref else f"{r['seconds']:.1f}"
        sd = f" ± {r['frechet_sd']:.2f}" if "frechet_sd" in r and not (r["name"] == "real_test") else ""
        lines.append(f"| {r['label']} | {steps} | {guidance} | {100 * r['accuracy']:.1f}% | {r['frechet']:.2f}{sd} | "
                     f"{r['diversity']:.3f} | {seconds} |")
    n = max((r["images"] for r in rows if r["group"] != "reference"), default=0)
    text = [
        f"Classifier test accuracy (real test split, {classifier_info['test_images']} images): "
        f"**{100 * classifier_info['test_accuracy']:.1f}%**. Each generated row: {n} images "
        f"({n // 10} per digit), same prompts and initial noise in every row.",
        "",
        *lines,
        "",
        "Accuracy: share of images the classifier reads as the digit asked for. Fréchet distance: between the "
        "classifier's hidden features of the row's images and of the real test images (lower is better); "
        f"± is its standard deviation over {n_boot} bootstrap resamples of both image sets. "
        "Diversity: mean pixel distance between two images of the same digit at 8x8 (ink in [0, 1]); "
        "mode collapse drives it to 0.",
    ]
    checks = goal_check(rows)
    if checks:
        text += ["", "Goal of the first run (beat the base), measured: a 1-step YOSO-LoRA row beats every base row on accuracy and "
                 "Fréchet distance, is within 1.5x the teacher's Fréchet distance and within 20% of its diversity.", "",
                 "| 1-step row | beats base accuracy | beats base Fréchet | Fréchet / teacher | diversity / teacher | all met |",
                 "| --- | --- | --- | ---: | ---: | --- |"]
        for c in checks:
            text.append(f"| {c['label']} | {_verdict(c, 'accuracy')} | {_verdict(c, 'frechet')} | "
                        f"{c['frechet_over_teacher']:.2f} | {c['diversity_over_teacher']:.2f} | {_yes(c['all_met'])} |")
    match = teacher_match_check(rows)
    if match["rows"]:
        text += ["", f"Goal (match the teacher), measured: the 1-step EMA row, with or without IPI, within "
                 f"{TEACHER_FRECHET_FACTOR:g}x the teacher's Fréchet distance, within {TEACHER_ACCURACY_POINTS:g} point "
                 f"of its accuracy and within {100 * TEACHER_DIVERSITY_TOLERANCE:.0f}% of its diversity. "
                 f"Met: {_yes(match['met'])}.", "",
                 f"| 1-step row | Fréchet / teacher (<= {TEACHER_FRECHET_FACTOR:g}) | accuracy - teacher, points "
                 f"(within ±{TEACHER_ACCURACY_POINTS:g}) | diversity / teacher "
                 f"({1 - TEACHER_DIVERSITY_TOLERANCE:.2f}-{1 + TEACHER_DIVERSITY_TOLERANCE:.2f}) | all met |",
                 "| --- | ---: | ---: | ---: | --- |"]
        for c in match["rows"]:
            text.append(f"| {c['label']} | {c['frechet_over_teacher']:.3f} {_mark(c['frechet_met'])} | "
                        f"{c['accuracy_minus_teacher_points']:+.1f} {_mark(c['accuracy_met'])} | "
                        f"{c['diversity_over_teacher']:.3f} {_mark(c['diversity_met'])} | {_yes(c['all_met'])} |")
    real = real_data_check(rows)
    if real["rows"]:
        text += ["", "Goal (real data beats the teacher), measured: the real-data 1-step EMA row's Fréchet distance below the teacher's "
                 f"and below every base row's. Met: {_yes(real['met'])} (the IPI row is shown beside it).", "",
                 "| 1-step row | Fréchet | teacher's | below teacher | best base row | below every base row |",
                 "| --- | ---: | ---: | --- | --- | --- |"]
        for c in real["rows"]:
            missed, n = c["base_rows_not_beaten"], c["n_base_rows"]
            named = f", not {'; '.join(missed)}" if len(missed) <= 2 else ""
            below = "yes" if not missed else f"**no**: beats {n - len(missed)} of {n}{named}"
            text.append(f"| {c['label']} | {c['frechet']:.2f} | {c['teacher_frechet']:.2f} | {_yes(c['below_teacher'])} | "
                        f"{c['best_base_row']}: {c['best_base_frechet']:.2f} | {below} |")
    if extra:
        text += ["", *extra]
    text += ["", f"Made by `{command}`."]
    return "\n".join(text) + "\n"


def sample_figure(rows, previews, path, per_digit=2, title=None):
    """One row per method, one column per digit, ``per_digit`` samples side by side in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Cells at half resolution (32 px): the images hold 8x8 pixels of information, and the file stays small.
    previews = {k: v.reshape(*v.shape[:2], v.shape[2] // 2, 2, v.shape[3] // 2, 2, 3).mean(axis=(3, 5)).round().astype(np.uint8)
                for k, v in previews.items()}
    first = next(iter(previews.values()))
    size = first.shape[2]
    gap, cell_gap = 1, 5
    cell_w = per_digit * size + (per_digit - 1) * gap
    width = 10 * cell_w + 9 * cell_gap
    height = len(rows) * size + (len(rows) - 1) * cell_gap
    mosaic = np.full((height, width, 3), 235, np.uint8)
    for i, r in enumerate(rows):
        p = previews[r["name"]]
        y = i * (size + cell_gap)
        for d in range(10):
            for k in range(per_digit):
                x = d * (cell_w + cell_gap) + k * (size + gap)
                mosaic[y : y + size, x : x + size] = p[d, k]
    dpi = 100  # one mosaic pixel per output pixel: sharp and small
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([d * (cell_w + cell_gap) + cell_w / 2 for d in range(10)], [str(d) for d in range(10)])
    ax.set_yticks([i * (size + cell_gap) + size / 2 for i in range(len(rows))], [r["label"] for r in rows], fontsize=8)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_xlabel(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("L").save(path, optimize=True)  # grey digits and black text: one channel
    return str(path)


def write_report(run_dir, results, figures_dir, prefix, command, meta, n_boot=25):
    """Write ``<prefix>_results.md``, ``<prefix>_results.json`` and ``<prefix>_samples.png`` into ``figures_dir``."""
    run_dir, figures_dir = Path(run_dir), Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    classifier_info = json.loads((run_dir / "classifier.json").read_text())
    from experiments.digits import classifier as C

    clf = C.DigitClassifier.load(run_dir / "classifier.npz")
    _, _, test8, _ = C.real_8x8_split()
    reference = clf.features(test8)
    rows = [{k: v for k, v in r.items() if k != "settings"} for r in results]
    previews = {}
    for r in rows:
        with np.load(run_dir / "eval" / f"{r['name']}.npz") as f:
            previews[r["name"]] = f["preview"]
            r["frechet_sd"] = C.frechet_bootstrap_sd(clf.features(f["images8"]), reference, n_boot=n_boot)
    figure_rows = [r for r in rows if r["name"] not in ("real_train", "vae_reconstruction")]
    fig_path = sample_figure(figure_rows, previews, figures_dir / f"{prefix}_samples.png",
                             title="first two samples per digit; every row starts from the same noise")
    md = markdown_table(rows, classifier_info, command, meta.get("notes"), n_boot)
    md_path = figures_dir / f"{prefix}_results.md"
    md_path.write_text(md)
    payload = {"command": command, "classifier": classifier_info, "rows": rows, "goals": goals(rows), **meta}
    json_path = figures_dir / f"{prefix}_results.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return {"markdown": str(md_path), "json": str(json_path), "figure": fig_path}
