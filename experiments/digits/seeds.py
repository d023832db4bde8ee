"""The spread over training seeds: the main (teacher) run and the real-data run trained again with other
seeds, their 1-step EMA rows (plain and IPI) measured like the table's, and a report of every seed with the
mean and standard deviation.

One run is one seed: a GAN's result at a fixed budget moves with the seed, and with float rounding alone (a
change of memory layout in the training step moves it as a new seed would), so the table's single-seed rows
are read against this spread. The table's own seed is its own run (``yoso/<run>``); the others are trained
into ``yoso_seeds/<run>_seed<seed>``.

    python experiments/digits/run.py --seeds 0 1 2 3 4    # after the full run; writes figures/digits_seeds.{md,json}
"""

import json
import statistics
from pathlib import Path

from experiments.digits.evaluate import YOSO_RUNS, RowSpec
from experiments.digits.report import EPS, TEACHER_FRECHET_FACTOR

SEED_RUNS = ("main", "real_data")
SEEDS_DIR = "yoso_seeds"


TRIALS_DIR = "trials"


def trial_dir(trial):
    """A recipe trial's folder under the run directory: its seed runs and its report (``run.py --trial``)."""
    return f"{TRIALS_DIR}/{trial}"


def run_dir(run, seed, table_seed, trial=None):
    """The run's folder under the run directory: the table's own run for the table's seed; a trial's runs
    (every seed, the table's too: other flags) in the trial's folder."""
    if trial:
        return f"{trial_dir(trial)}/{run}_seed{seed}"
    return f"yoso/{run}" if seed == table_seed else f"{SEEDS_DIR}/{run}_seed{seed}"


def run_marker(run, seed, table_seed, trial=None):
    return run_dir(run, seed, table_seed, trial) + ".done.json" if trial or seed != table_seed else f"yoso/{run}.done.json"


def row_prefix(trial=None):
    return f"trial_{trial}_" if trial else ""


def seed_row_specs(runs, seeds, table_seed, trial=None):
    """The 1-step EMA rows (plain and IPI) of every (run, seed), sampled as the table's; a trial's rows are
    named after the trial, so trials and the seed study keep their own evaluations."""
    rows, prefix = [], row_prefix(trial)
    for run in runs:
        label = YOSO_RUNS[run][0] + (f" [trial {trial}]" if trial else "")
        for seed in seeds:
            lora = run_dir(run, seed, table_seed, trial)
            rows += [
                RowSpec(f"{prefix}seed_{run}_{seed}_1", f"{label}, seed {seed}, EMA, 1 step", f"seed_{run}", "base", "lcm",
                        1, 1.0, lora),
                RowSpec(f"{prefix}seed_{run}_{seed}_1_ipi", f"{label}, seed {seed}, EMA, 1 step + IPI", f"seed_{run}",
                        "base", "lcm", 1, 1.0, lora, lora, True),
            ]
    return rows


def summarize(results, runs, seeds, trial=None):
    """Per run: each seed's 1-step numbers, their mean and sd, and in how many seeds the plain 1-step row's
    Fréchet distance is below the teacher's and below every base row's."""
    by_name = {r["name"]: r for r in results}
    teacher = by_name["teacher"]
    base = [r for r in results if r["group"] == "base"]
    best_base = min(base, key=lambda r: r["frechet"])
    summary = {"teacher_frechet": teacher["frechet"], "teacher_accuracy": teacher["accuracy"],
               "teacher_diversity": teacher["diversity"],
               "best_base": {"label": best_base["label"], "frechet": best_base["frechet"]}, "runs": {}}
    for run in runs:
        per_seed = []
        for seed in seeds:
            key = f"{row_prefix(trial)}seed_{run}_{seed}_1"
            plain, ipi = by_name[key], by_name[key + "_ipi"]
            per_seed.append({"seed": seed, "frechet": plain["frechet"], "accuracy": plain["accuracy"],
                             "diversity": plain["diversity"], "frechet_ipi": ipi["frechet"], "accuracy_ipi": ipi["accuracy"]})
        stats = {}
        for key in ("frechet", "accuracy", "diversity", "frechet_ipi"):
            values = [s[key] for s in per_seed]
            stats[key] = {"mean": statistics.fmean(values),
                          "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "min": min(values), "max": max(values)}
        summary["runs"][run] = {
            "label": YOSO_RUNS[run][0], "seeds": per_seed, "stats": stats,
            "seeds_below_teacher": sum(s["frechet"] < teacher["frechet"] for s in per_seed),
            "seeds_below_every_base_row": sum(s["frechet"] < best_base["frechet"] for s in per_seed),
            "seeds_frechet_within_goal_of_teacher": sum(s["frechet"] <= TEACHER_FRECHET_FACTOR * teacher["frechet"] + EPS
                                                        for s in per_seed),
        }
    return summary


def markdown(summary, command, n_images):
    t = summary
    lines = [
        f"Training seeds: the 1-step EMA rows of each run ({n_images} images a row, sampled as the table's). Teacher: "
        f"Fréchet {t['teacher_frechet']:.2f}, accuracy {100 * t['teacher_accuracy']:.1f}%, diversity "
        f"{t['teacher_diversity']:.3f}; best base row: {t['best_base']['label']}, Fréchet {t['best_base']['frechet']:.2f}.",
        "",
        "| Run | Seed | Fréchet, 1 step | Accuracy | Diversity | Fréchet, 1 step + IPI |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, r in t["runs"].items():
        for s in r["seeds"]:
            lines.append(f"| {r['label']} | {s['seed']} | {s['frechet']:.2f} | {100 * s['accuracy']:.1f}% | "
                         f"{s['diversity']:.3f} | {s['frechet_ipi']:.2f} |")
        st = r["stats"]
        lines.append(f"| {r['label']} | mean ± sd | {st['frechet']['mean']:.2f} ± {st['frechet']['sd']:.2f} | "
                     f"{100 * st['accuracy']['mean']:.1f}% ± {100 * st['accuracy']['sd']:.1f} | "
                     f"{st['diversity']['mean']:.3f} ± {st['diversity']['sd']:.3f} | "
                     f"{st['frechet_ipi']['mean']:.2f} ± {st['frechet_ipi']['sd']:.2f} |")
    lines.append("")
    n = len(next(iter(t["runs"].values()))["seeds"]) if t["runs"] else 0
    for run, r in t["runs"].items():
        lines.append(f"* {r['label']}: 1-step Fréchet below the teacher's in {r['seeds_below_teacher']} of {n} seeds, "
                     f"below every base row's in {r['seeds_below_every_base_row']} of {n}, within {TEACHER_FRECHET_FACTOR:g}x "
                     f"the teacher's in {r['seeds_frechet_within_goal_of_teacher']} of {n}.")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def write_seed_report(results, runs, seeds, figures_dir, prefix, command, meta, trial=None):
    """``<prefix>_seeds.md`` and ``<prefix>_seeds.json`` in ``figures_dir``."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, runs, seeds, trial)
    n_images = max(r["images"] for r in results if r["name"].startswith(row_prefix(trial) + "seed_"))
    md_path, json_path = figures_dir / f"{prefix}_seeds.md", figures_dir / f"{prefix}_seeds.json"
    md_path.write_text(markdown(summary, command, n_images))
    json_path.write_text(json.dumps({"command": command, "summary": summary, **meta}, indent=2) + "\n")
    return {"markdown": str(md_path), "json": str(json_path)}
