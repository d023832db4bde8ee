"""Evaluating YOSO LoRAs on a prompt set: the plan (prompts, runs, seeds, shards), making the images
resumably, and the reports (JSON, markdown table, image grid). The metrics are ``yoso.evaluation.metrics``'s.

A *run* is one LoRA sampled in one mode (``yoso.evaluation.inference.MODES``) at one step count. Image ``k`` of every
run is prompt ``k`` drawn with its own generator seeded ``seed + k``, so it does not depend on which images
were already on disk, on the batch it falls into, or on the process that makes it; every run sees the
same noise for the same prompt. Under ``accelerate launch`` process ``r`` of ``W`` makes the images
``k = r, r + W, r + 2W, ...`` of every run.

Layout of the output folder::

    prompts.jsonl                               the prompt set: index, prompt, seed, COCO image file
    images/<lora>/<mode>-<steps>step/run.json   the run's settings (a resumed run must have the same)
    images/<lora>/<mode>-<steps>step/00000.png  image k, written whole or not at all (settings in its PNG text)
    metrics.json, metrics.md, grid.png          the reports, written by the main process at the end
"""

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from yoso.utils.atomic import atomic_path
from yoso.evaluation.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS, MODES, ONE_STEP_MODES

PROMPTS_NAME = "prompts.jsonl"
RUN_SETTINGS_NAME = "run.json"
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
GRID_NAME = "grid.png"
REFERENCE_CHOICES = ("all", "matched")


class EvaluationError(ValueError):
    """Bad input to an evaluation (a prompt file, a mode, an output folder made with other settings);
    the message is one line naming the flag or file."""


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.") or "lora"


# --------------------------------------------------------------------------------------------------
# Prompt sources


def _normalize(text):
    return " ".join(str(text).split())


def _coco_captions(path, data):
    """COCO captions annotations -> [(image file name, [captions...])] in image id order."""
    try:
        files = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        captions = {}
        for ann in sorted(data["annotations"], key=lambda a: int(a["id"])):
            text = _normalize(ann["caption"])
            if text:
                captions.setdefault(int(ann["image_id"]), []).append(text)
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(f"--prompts {path} is not a COCO captions file (images with id and file_name, "
                              f"annotations with image_id, id and caption): {exc!r}") from exc
    missing = [i for i in captions if i not in files]
    if missing:
        raise EvaluationError(f"--prompts {path}: annotation for image_id {missing[0]}, which is not in its images list")
    return [(files[i], captions[i]) for i in sorted(captions)]


def _jsonl_prompts(path, text):
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"--prompts {path}: line {number} is not JSON ({exc.msg})") from exc
        if isinstance(record, dict):
            record = next((record[k] for k in ("prompt", "caption", "text") if k in record), None)
        if not isinstance(record, str):
            raise EvaluationError(f"--prompts {path}: line {number} has no 'prompt', 'caption' or 'text' string")
        if _normalize(record):
            prompts.append(_normalize(record))
    return prompts


def read_prompts(path, num_prompts=None, prompt_seed=0):
    """The prompt set: ``[{"prompt": str, "image_file": str | None}]``.

    - ``.json``: COCO captions annotations (e.g. ``captions_val2014.json``): ``num_prompts`` images drawn
      with ``random.Random(prompt_seed)`` (all when None), one of each image's captions drawn with the same
      generator; ``image_file`` is the image's file name (for ``--reference_images matched``).
    - ``.txt``: one prompt per line; ``.jsonl``: one JSON object per line with "prompt", "caption" or "text"
      (or a JSON string). ``num_prompts`` of them are drawn with the seed, kept in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--prompts {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".txt"):
        raise EvaluationError(f"--prompts {path}: expected a COCO captions .json, a .txt (one prompt a line) or a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"--prompts {path} could not be read as UTF-8 text: {exc}") from exc
    rng = random.Random(prompt_seed)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"--prompts {path} is not JSON ({exc.msg}, line {exc.lineno})") from exc
        if not isinstance(data, dict):
            raise EvaluationError(f"--prompts {path} is not a COCO captions file (a JSON object with images and annotations)")
        images = _coco_captions(path, data)
        chosen = _choose(path, len(images), num_prompts, rng, unit="captioned images")
        return [{"prompt": rng.choice(images[i][1]), "image_file": images[i][0]} for i in chosen]
    prompts = _jsonl_prompts(path, text) if suffix == ".jsonl" else [_normalize(l) for l in text.splitlines() if l.strip()]
    chosen = _choose(path, len(prompts), num_prompts, rng, unit="prompts")
    return [{"prompt": prompts[i], "image_file": None} for i in chosen]


def _choose(path, available, num_prompts, rng, unit):
    if available == 0:
        raise EvaluationError(f"--prompts {path} has no prompts")
    if num_prompts is None:
        return list(range(available))
    if num_prompts > available:
        raise EvaluationError(f"--num_prompts {num_prompts} is more than the {available} {unit} in --prompts {path}")
    return sorted(rng.sample(range(available), num_prompts))


# --------------------------------------------------------------------------------------------------
# Runs


def parse_modes(tokens, steps=None):
    """``--modes`` tokens -> ``[(mode, steps)]``, in order, without repeats.

    A token is ``MODE`` or ``MODE:STEPS[,STEPS...]`` (``lcm:1,2,4``). A bare lcm/dpm takes the step counts
    of ``--steps`` (``steps``; default 2); the one-step modes take 1 step and nothing else."""
    runs, bare_multi_step = [], False
    for token in tokens:
        mode, colon, spec = str(token).partition(":")
        if mode not in MODES:
            raise EvaluationError(f"--modes {token}: unknown mode {mode!r}; choose from {', '.join(MODES)} (MODE or MODE:STEPS,STEPS)")
        if colon:
            try:
                counts = [int(s) for s in spec.split(",")]
            except ValueError:
                raise EvaluationError(f"--modes {token}: steps must be integers, e.g. {mode}:1,2,4") from None
        elif mode in ONE_STEP_MODES:
            counts = [1]
        else:
            bare_multi_step = True
            counts = list(steps) if steps else [DEFAULT_STEPS[mode]]
        for n in counts:
            if n < 1:
                raise EvaluationError(f"--modes {token}: steps must be >= 1, got {n}")
            if mode in ONE_STEP_MODES and n != 1:
                raise EvaluationError(f"--modes {token}: {mode} takes one step, not {n}")
            if (mode, n) not in runs:
                runs.append((mode, n))
    if steps and not bare_multi_step:
        raise EvaluationError("--steps applies to lcm or dpm named without :STEPS in --modes, and there is none")
    return runs


def lora_names(specs):
    """Short unique names for the LoRAs (folder names for the images and rows of the table)."""
    def candidates(spec):
        path = Path(str(spec).rstrip("/"))
        last = path.stem if path.suffix == ".safetensors" else path.name
        yield _slug(last)
        if path.parent.name:
            yield _slug(f"{path.parent.name}-{last}")

    names = []
    for i, spec in enumerate(specs):
        options = [c for c in candidates(spec) if c not in names]
        name = options[0] if options else f"{_slug(Path(str(spec)).name)}-{i}"
        names.append(name)
    return names


@dataclass(frozen=True)
class Run:
    lora_index: int
    lora_name: str
    mode: str
    steps: int
    guidance_scale: float

    @property
    def name(self):
        return f"{self.lora_name}/{self.mode}-{self.steps}step"

    def folder(self, output_dir):
        return Path(output_dir) / "images" / self.lora_name / f"{self.mode}-{self.steps}step"

    def image_path(self, output_dir, index):
        return self.folder(output_dir) / f"{index:05d}.png"


def image_seed(seed, index):
    """Each image's own generator seed: image k of every run shares it."""
    return int(seed) + int(index)


def shard(num_items, rank, world_size):
    """Indices that process ``rank`` of ``world_size`` works on: every world_size-th, from ``rank``."""
    return list(range(rank, num_items, world_size))


@dataclass
class Plan:
    """Everything an evaluation makes, decided before any model is loaded."""

    output_dir: Path
    base_model: str
    loras: list  # yoso.evaluation.inference.LoraSource, one per --lora
    lora_sha256: list  # of the weight file (None for a hub id)
    latent_stats: list  # per LoRA: (path, sha256) or None
    prompts: list  # [{"prompt", "image_file"}]
    runs: list  # [Run]
    seed: int
    lora_scale: float
    dtype: str
    extra: dict = field(default_factory=dict)  # prompt source, reference, for the reports

    def prompt_records(self):
        return [{"index": k, "prompt": p["prompt"], "seed": image_seed(self.seed, k), "image_file": p["image_file"]}
                for k, p in enumerate(self.prompts)]

    def run_settings(self, run):
        stats = self.latent_stats[run.lora_index] if run.mode == "one_step_ipi" else None
        return {"base_model": self.base_model, "lora": self.loras[run.lora_index].spec,
                "lora_sha256": self.lora_sha256[run.lora_index], "lora_scale": self.lora_scale, "mode": run.mode,
                "steps": run.steps, "guidance_scale": run.guidance_scale, "dtype": self.dtype,
                "latent_stats_sha256": stats[1] if stats else None}

    def pending(self, rank=0, world_size=1):
        """``{run: [indices]}``: the images of this process's share that are not on disk yet."""
        mine = shard(len(self.prompts), rank, world_size)
        return {run: todo for run in self.runs if (todo := [k for k in mine if not run.image_path(self.output_dir, k).exists()])}


def make_runs(lora_specs, mode_steps, guidance_scale=None):
    names = lora_names(lora_specs)
    return [Run(i, names[i], mode, steps, float(DEFAULT_GUIDANCE[mode] if guidance_scale is None else guidance_scale))
            for i in range(len(lora_specs)) for mode, steps in mode_steps]


# --------------------------------------------------------------------------------------------------
# Resuming: what is on disk must have been made with the same settings


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path} ({what}) is unreadable: {exc}; delete it to start that part again") from exc


def _first_difference(old, new):
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
    return None


def check_resume(plan):
    """Raise EvaluationError if ``plan.output_dir`` holds a prompt set or runs made with other settings."""
    prompts_file = plan.output_dir / PROMPTS_NAME
    if prompts_file.is_file():
        try:
            old = [json.loads(line) for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{prompts_file} is unreadable: {exc}") from exc
        new = plan.prompt_records()
        if old != new:
            where = next((k for k, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            raise EvaluationError(f"--output_dir {plan.output_dir} holds images of another prompt set ({PROMPTS_NAME} differs at "
                                  f"prompt {where}: other --prompts, --num_prompts, --prompt_seed or --seed): use another --output_dir")
    for run in plan.runs:
        settings_file = run.folder(plan.output_dir) / RUN_SETTINGS_NAME
        if settings_file.is_file():
            difference = _first_difference(_read_json(settings_file, "run settings"), plan.run_settings(run))
            if difference:
                raise EvaluationError(f"{settings_file}: run {run.name} was made with other settings ({difference}): "
                                      f"use another --output_dir or delete {settings_file.parent}")


def write_manifests(plan):
    """``prompts.jsonl`` and every run's ``run.json`` (each written whole, only when absent)."""
    prompts_file = plan.output_dir / PROMPTS_NAME
    if not prompts_file.exists():
        with atomic_path(prompts_file) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in plan.prompt_records()), encoding="utf-8")
    for run in plan.runs:
        settings_file = run.folder(plan.output_dir) / RUN_SETTINGS_NAME
        if not settings_file.exists():
            with atomic_path(settings_file) as tmp:
                tmp.write_text(json.dumps(plan.run_settings(run), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Generation


def generate_batch(pipe, mode, prompts, generators, steps, guidance_scale, latent_stats=None):
    """Images for ``prompts``, image i drawn from ``generators[i]`` alone (diffusers draws each sample of a
    batch from its own generator when given a list). The pipeline's scheduler must be ``mode``'s."""
    import torch

    from yoso.evaluation import inference as yi

    if mode != "one_step_ipi":
        return yi.generate(pipe, list(prompts), mode, steps=steps, guidance_scale=guidance_scale, generator=list(generators))
    # The informative prior, one sample per generator, exactly as yoso.evaluation.inference.generate draws it for one image.
    mean, std = latent_stats
    latents = torch.cat([yi.ipi_latents(pipe.scheduler, mean, std, 1, g) for g in generators])
    out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=list(generators),
               latents=latents.to(pipe.device, pipe.unet.dtype), height=mean.shape[1] * pipe.vae_scale_factor,
               width=mean.shape[2] * pipe.vae_scale_factor)
    return out.images


def save_image(image, path, parameters):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, ensure_ascii=False))
    with atomic_path(path) as tmp:
        image.save(tmp, pnginfo=info)


def generate_pending(pipe, plan, pending, batch_size, latent_stats, progress=None, rank=0):
    """Make the ``pending`` images (``{run: [indices]}``) and save each as soon as it exists.

    ``latent_stats``: per LoRA index, ``(mean, std)`` or None. LoRA ``i`` must be loaded into ``pipe``
    as adapter ``lora{i}``. Returns the number of images written."""
    import torch

    from yoso.evaluation import inference as yi

    written = 0
    for run, indices in pending.items():
        pipe.set_adapters([adapter_name(run.lora_index)], adapter_weights=[float(plan.lora_scale)])
        yi.set_scheduler(pipe, run.mode)
        settings = plan.run_settings(run)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            generators = [torch.Generator().manual_seed(image_seed(plan.seed, k)) for k in batch]
            prompts = [plan.prompts[k]["prompt"] for k in batch]
            images = generate_batch(pipe, run.mode, prompts, generators, run.steps, run.guidance_scale,
                                    latent_stats[run.lora_index])
            for k, prompt, image in zip(batch, prompts, images):
                save_image(image, run.image_path(plan.output_dir, k),
                           {**settings, "prompt": prompt, "index": k, "seed": image_seed(plan.seed, k), "rank": rank})
                written += 1
            if progress is not None:
                progress.update(len(batch))
    return written


def adapter_name(lora_index):
    return f"lora{lora_index}"


# --------------------------------------------------------------------------------------------------
# Metrics and reports


def compute_metrics(plan, reference_paths, fid_scorer, clip_scorer, progress_factory=None):
    """FID and CLIP score of every run; ``progress_factory(total, desc)`` makes a progress bar (or None)."""
    def bar(total, desc):
        return progress_factory(total, desc) if progress_factory else None

    progress = bar(len(reference_paths), "reference features")
    fid_scorer.set_reference(reference_paths, progress)
    if progress is not None:
        progress.close()
    captions = [p["prompt"] for p in plan.prompts]
    results = []
    for run in plan.runs:
        paths = [run.image_path(plan.output_dir, k) for k in range(len(plan.prompts))]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise EvaluationError(f"{len(missing)} images of run {run.name} are missing, e.g. {missing[0]}: run the same command again")
        progress = bar(2 * len(paths), f"metrics {run.name}")
        fid = fid_scorer.score(paths, progress)
        clip = clip_scorer.score(paths, captions, progress)
        if progress is not None:
            progress.close()
        results.append({"name": run.name, "lora": plan.loras[run.lora_index].spec, "lora_name": run.lora_name,
                        "mode": run.mode, "steps": run.steps, "guidance_scale": run.guidance_scale,
                        "lora_scale": plan.lora_scale, "num_images": len(paths),
                        "fid_reference_images": len(reference_paths), "fid": fid, "clip_score": clip,
                        "images": str(run.folder(plan.output_dir).relative_to(plan.output_dir))})
    return results


def build_report(plan, results, fid_protocol, clip_protocol, image_size, world_size):
    return {
        "base_model": plan.base_model,
        "prompts": {**plan.extra.get("prompts", {}), "num_prompts": len(plan.prompts)},
        "seed": plan.seed,
        "seeds": "image k of every run: its own torch.Generator seeded seed + k",
        "reference": plan.extra.get("reference", {}),
        "generation": {"image_size": list(image_size), "dtype": plan.dtype, "lora_scale": plan.lora_scale,
                       "world_size": world_size},
        "protocol": {"fid": fid_protocol, "clip_score": clip_protocol},
        "runs": results,
    }


def markdown_table(report):
    prompts, reference = report["prompts"], report["reference"]
    fid, clip = report["protocol"]["fid"], report["protocol"]["clip_score"]
    lines = [
        "# YOSO-LoRA evaluation",
        "",
        f"Base model `{report['base_model']}`; {prompts['num_prompts']} prompts from `{prompts.get('source')}` "
        f"(prompt seed {prompts.get('prompt_seed')}); image k seeded {report['seed']} + k; "
        f"{report['generation']['image_size'][0]}x{report['generation']['image_size'][1]} images, {report['generation']['dtype']}.",
        f"FID reference: {fid['num_reference_images']} images ({reference.get('images')}) from `{reference.get('dir')}`.",
        "",
        "| LoRA | mode | steps | guidance | images vs reference | FID ↓ | CLIP score ↑ |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        # The reference set's size beside the score: FID depends on it (--reference_images all: the whole folder).
        lines.append(f"| {r['lora_name']} | {r['mode']} | {r['steps']} | {r['guidance_scale']:g} | "
                     f"{r['num_images']} vs {r['fid_reference_images']} | {r['fid']:.2f} | {r['clip_score']:.2f} |")
    lines += [
        "",
        f"- FID: {fid['feature_extractor']}; {fid['preprocessing']}; {fid['implementation']}.",
        f"- CLIP score: `{clip['model']}`; {clip['preprocessing']}; {clip['definition']}.",
        "",
    ]
    return "\n".join(lines)


def image_grid(plan, num_columns, thumb=256, label_width=220):
    """Rows: the runs; columns: the first ``num_columns`` prompts; each row labelled with its run."""
    from PIL import Image, ImageDraw

    columns = min(num_columns, len(plan.prompts))
    grid = Image.new("RGB", (label_width + columns * thumb, len(plan.runs) * thumb), "white")
    draw = ImageDraw.Draw(grid)
    for row, run in enumerate(plan.runs):
        draw.multiline_text((8, row * thumb + 8), run.name.replace("/", "/\n"), fill="black")
        for col in range(columns):
            with Image.open(run.image_path(plan.output_dir, col)) as image:
                grid.paste(image.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (label_width + col * thumb, row * thumb))
    return grid


def write_reports(plan, report, grid_columns=8):
    """``metrics.json``, ``metrics.md`` and ``grid.png`` in the output folder, each written whole."""
    out = plan.output_dir
    with atomic_path(out / METRICS_JSON) as tmp:
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_path(out / METRICS_MD) as tmp:
        tmp.write_text(markdown_table(report), encoding="utf-8")
    size = report["generation"]["image_size"]
    grid = image_grid(plan, grid_columns, thumb=min(256, size[0]))
    with atomic_path(out / GRID_NAME) as tmp:
        grid.save(tmp)
    return [out / METRICS_JSON, out / METRICS_MD, out / GRID_NAME]
