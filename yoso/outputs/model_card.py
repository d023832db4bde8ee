"""The model card: ``--output_dir/README.md`` in the Hub's format (YAML metadata, then Markdown).

The metadata is the one diffusers' training scripts write (``ModelCardData`` with the base model, the base's
license, ``library_name: diffusers``, ``inference: true``; tags added with diffusers'
``populate_model_card``: diffusers' usual training tags and ours); the body says what the files are, how to use them
(docs/inference.md's 2-step LCM and 1-step informative-prior snippets, pointing at this folder or at the Hub
repository), shows the latest validation grid, and lists the teacher, the data and the settings of the run.
"""

import json
import re
from pathlib import Path

from yoso.utils.atomic import atomic_path
from yoso.outputs.output_files import HUB_NAMES, MODEL_CARD_NAME, is_run_file, latest_validation_grid
from yoso.outputs.kohya import KOHYA_WEIGHT_NAME
from yoso.data.latent_stats import LATENT_STATS_NAME
from yoso.method.lora import LORA_WEIGHT_NAME

# diffusers' LoRA training scripts' tags (train_text_to_image_lora.py), then ours.
TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "diffusers-training", "lora",
        "yoso"]
PAPER = "https://arxiv.org/abs/2403.12931"
DEFAULT_PROMPT = "A photo of a man, XT3"  # the usage snippets' (README.md, docs/inference.md)

# Licenses of known base models (the Hub's license identifiers). A LoRA is a derivative of its base.
BASE_LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-3": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-2": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-1": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
}
UNKNOWN_LICENSE = "other"

# The flags of train_yoso_lora.py shown in the card's settings table, in this order (absent ones are skipped).
TEACHER_SETTINGS = ("pretrained_teacher_model", "teacher_num_inference_steps", "teacher_guidance_scale", "train_data")
IMAGE_SETTINGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "center_crop", "random_flip")
SETTINGS = (
    "pretrained_model_name_or_path", "revision", "variant", "pretrained_teacher_model", "teacher_latent_cache",
    "teacher_num_inference_steps", "teacher_guidance_scale", "train_data", "dataset_name", "dataset_config_name",
    "train_data_dir", "image_column", "caption_column", "center_crop", "random_flip", "max_train_samples", "resolution", "prediction_type", "lora_rank", "lora_alpha", "lora_target_modules",
    "lambda_con", "lambda_kl", "lambda_adv", "snr_gamma", "coop_gap", "consistency_gap", "gan_loss_reduction",
    "noise_offset", "use_ema", "ema_decay", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
    "num_train_epochs", "learning_rate", "discriminator_learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision",
    "gradient_checkpointing", "seed",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_hub_id(name):
    """``owner/name`` and not a local path: the form the Hub's ``base_model`` field accepts."""
    return bool(name) and bool(_HUB_ID.match(str(name))) and not Path(str(name)).expanduser().exists()


def base_license(base_model):
    """The Hub license identifier of ``base_model`` from :data:`BASE_LICENSES`, else ``"other"``."""
    return BASE_LICENSES.get(str(base_model), UNKNOWN_LICENSE)


def write_model_card(output_dir, args_dict, *, repo_id=None, base_model=None, license=None, num_processes=None,
                     num_samples=None):
    """Write ``output_dir/README.md`` (atomically) and return its path.

    ``args_dict``: ``vars(args)`` of train_yoso_lora.py. ``repo_id``: the Hub repository the folder is
    uploaded to; the snippets and file names then refer to it (see :mod:`yoso.outputs.hub`), otherwise to
    ``output_dir`` as given. ``base_model``: the Hub id to name as the base (default:
    ``--pretrained_model_name_or_path`` when it is a Hub id; a local base is left out of the metadata).
    ``license``: default from :data:`BASE_LICENSES`, ``"other"`` for an unknown base. ``num_processes``:
    shown with the global batch size. ``num_samples``: the prompts or images trained on (None: not stated).
    """
    output_dir = Path(output_dir)
    text = model_card_text(output_dir, args_dict, repo_id=repo_id, base_model=base_model, license=license,
                           num_processes=num_processes, num_samples=num_samples)
    path = output_dir / MODEL_CARD_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def trains_on_images(args_dict):
    """Whether the run trained on images with captions (no teacher) rather than on the teacher's latents."""
    return bool(args_dict.get("dataset_name") or args_dict.get("train_data_dir"))


def model_card_text(output_dir, args_dict, *, repo_id=None, base_model=None, license=None, num_processes=None,
                    num_samples=None):
    """The card's text (see :func:`write_model_card`)."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    base = str(base_model or args_dict.get("pretrained_model_name_or_path") or "")
    hub_base = base if is_hub_id(base) else None
    license = license or base_license(base)
    # The fields diffusers' load_or_create_model_card(from_training=True) sets (its template's body is not used:
    # its TODO sections would stand beside ours, and its load branch would pick up a stale README of this folder).
    data = ModelCardData(base_model=hub_base, license=license, library_name="diffusers", pipeline_tag="text-to-image",
                         inference=True)
    body = "\n\n".join(section for section in (
        _title(base, repo_id),
        _files_section(output_dir, args_dict, repo_id),
        _usage_section(output_dir, args_dict, repo_id, base),
        _validation_section(output_dir),
        _training_section(args_dict, num_processes, num_samples),
        _license_section(base, license, args_dict),
    ) if section)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")  # parses the header: a malformed one raises here
    card = populate_model_card(card, tags=list(TAGS))
    return str(card)


# ---- sections -------------------------------------------------------------------------------------------


def _title(base, repo_id):
    name = repo_id.split("/")[-1] if repo_id else "YOSO-LoRA"
    return (f"# {name}\n\n"
            f"A LoRA that turns `{base}` into a one- or two-step text-to-image generator, trained with "
            f"`train_yoso_lora.py`: \"You Only Sample Once: Taming One-Step Text-to-Image Synthesis by "
            f"Self-Cooperative Diffusion GANs\" ([arXiv 2403.12931]({PAPER})).")


def _name(local, repo_id):
    """How a reader of the card finds the file ``local`` (relative to the output folder)."""
    return HUB_NAMES.get(local, local) if repo_id else local


def _files_section(output_dir, args_dict, repo_id):
    ema = bool(args_dict.get("use_ema"))
    described = [
        (LORA_WEIGHT_NAME, "the LoRA, diffusers format" + (" (the EMA of the weights)" if ema else "")),
        (KOHYA_WEIGHT_NAME, "the same LoRA, kohya format (AUTOMATIC1111, ComfyUI)"),
        (f"non_ema/{LORA_WEIGHT_NAME}", "the raw LoRA (without EMA), diffusers format"),
        (f"non_ema/{KOHYA_WEIGHT_NAME}", "the raw LoRA, kohya format"),
        (LATENT_STATS_NAME, "mean and std of the training latents, for 1-step sampling with the informative prior"),
    ]
    rows = [f"| `{_name(local, repo_id)}` | {what} |" for local, what in described if is_run_file(output_dir, local)]
    if latest_validation_grid(output_dir):
        rows.append("| `validation/` | validation grids saved during training |")
    return "## Files\n\n| file | what |\n|---|---|\n" + "\n".join(rows)


def _snippet_start(base, extra_imports=""):
    """The lines every usage snippet starts with: the base pipeline with LCMScheduler, on CUDA in fp16 when
    there is a GPU, else on the CPU in float32."""
    return ("import torch\n"
            "from diffusers import DiffusionPipeline, LCMScheduler\n"
            + extra_imports
            + 'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
            'dtype = torch.float16 if device == "cuda" else torch.float32  # fp16 needs a GPU\n'
            f"pipeline = DiffusionPipeline.from_pretrained({json.dumps(base)}, dtype=dtype).to(device)\n"
            "pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)\n")


def _usage_section(output_dir, args_dict, repo_id, base):
    lora = repo_id or str(output_dir)
    prompts = args_dict.get("validation_prompts") or [DEFAULT_PROMPT]
    prompt = json.dumps(prompts[0], ensure_ascii=False)
    parts = ["## Usage",
             "**2 steps, LCM scheduler** (guidance about 1.5):",
             "```python\n" + _snippet_start(base)
             + f"pipeline.load_lora_weights({json.dumps(lora)})\n"
             "generator = torch.manual_seed(318)\n"
             f"imgs = pipeline(prompt={prompt}, num_inference_steps=2, guidance_scale=1.5, generator=generator)[0]\n"
             "imgs[0]\n```"]
    if is_run_file(output_dir, LATENT_STATS_NAME):
        if repo_id:
            extra = "from huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n"
            load_stats = f"stats = load_file(hf_hub_download(lora, {json.dumps(LATENT_STATS_NAME)}))\n"
        else:
            extra = "from safetensors.torch import load_file\n"
            load_stats = f'stats = load_file(f"{{lora}}/{LATENT_STATS_NAME}")\n'
        parts += [
            ("**1 step with the informative prior (IPI)**: start from the training latents' statistics "
             f"(`{LATENT_STATS_NAME}`) instead of pure noise, then one LCM step."),
            "```python\n" + _snippet_start(base, extra)
            + f"lora = {json.dumps(lora)}\n"
            "pipeline.load_lora_weights(lora)\n"
            + load_stats
            + "generator = torch.manual_seed(318)\n"
            "T = torch.tensor([999])\n"
            'init = stats["mean"] + stats["std"] * torch.randn((1, *stats["mean"].shape), generator=generator)\n'
            "latents = pipeline.scheduler.add_noise(init, torch.randn(init.shape, generator=generator), T)\n"
            "latents = latents / pipeline.scheduler.init_noise_sigma\n"
            f"imgs = pipeline(prompt={prompt}, num_inference_steps=1, guidance_scale=1.5, generator=generator,\n"
            '                latents=latents.to(device, dtype))[0]\n'
            "imgs[0]\n```",
        ]
    if is_run_file(output_dir, f"non_ema/{LORA_WEIGHT_NAME}"):
        if repo_id:
            call = f"pipeline.load_lora_weights({json.dumps(lora)}, weight_name={json.dumps(_name(f'non_ema/{LORA_WEIGHT_NAME}', repo_id))})"
        else:
            call = f"pipeline.load_lora_weights({json.dumps(str(output_dir / 'non_ema'))})"
        parts.append(f"The raw (non-EMA) LoRA: `{call}`.")
    if is_run_file(output_dir, KOHYA_WEIGHT_NAME):
        parts.append(
            f"**AUTOMATIC1111, ComfyUI and other UIs**: use `{_name(KOHYA_WEIGHT_NAME, repo_id)}` (kohya format; "
            "put it in the UI's LoRA folder) with an LCM sampler, 1 or 2 steps and a CFG scale of 1 to 1.5.")
    return "\n\n".join(parts)


def _validation_section(output_dir):
    grid = latest_validation_grid(output_dir)
    if grid is None:
        return ""
    step = int(re.search(r"\d+", Path(grid).name).group())
    text = f"## Validation samples\n\n![validation grid at step {step}]({grid})\n\nAt training step {step}."
    legend = output_dir / "validation" / "README.txt"
    if legend.is_file():
        text += "\n\n```text\n" + legend.read_text(encoding="utf-8").strip() + "\n```"
    return text


def _data_line(args_dict, num_samples):
    """What the run trained on, in words: the data source, its columns, the augmentation, the sample count."""
    from yoso.data.image_data import DEFAULT_PROMPT_CAPTION_COLUMN

    limit = args_dict.get("max_train_samples")
    count = f"{num_samples} samples" if num_samples else (f"at most {limit} samples" if limit else "")
    if trains_on_images(args_dict):
        if args_dict.get("dataset_name"):
            source = f"the dataset `{args_dict['dataset_name']}`"
            if args_dict.get("dataset_config_name"):
                source += f" (configuration `{args_dict['dataset_config_name']}`)"
            if args_dict.get("streaming"):
                source += ", streamed"
        else:
            source = f"the folder `{args_dict['train_data_dir']}`"
        image = args_dict.get("image_column") or "image"
        caption = args_dict.get("caption_column") or "text (txt for tar shards)"
        crop = "center crop" if args_dict.get("center_crop") else "random crop"
        flip = "random horizontal flip" if args_dict.get("random_flip") else "no flip"
        return (f"- Data: images with captions from {source}: image column `{image}`, caption column `{caption}`; "
                f"{args_dict.get('resolution', 512)} px, {crop}, {flip}" + (f"; {count}" if count else "")
                + ". The base model's VAE encodes each image into its training latent.")
    if not args_dict.get("train_data"):
        return None
    train_data = str(args_dict["train_data"])
    field = ""
    if train_data.endswith((".jsonl", ".json")):
        field = f" (field `{args_dict.get('caption_column') or DEFAULT_PROMPT_CAPTION_COLUMN}`)"
    return (f"- Data: prompts from `{train_data}`{field}" + (f", {count}" if count else "")
            + "; the training reads prompt text only.")


def _training_section(args_dict, num_processes, num_samples=None):
    lines = ["## Training", ""]
    images = trains_on_images(args_dict)
    if images:
        cache = args_dict.get("teacher_latent_cache")
        lines.append("- Teacher: none; the training latents are the base VAE's encodings of the images"
                     + (f", precomputed into `{cache}` (`--teacher_latent_cache`)." if cache else "."))
    elif args_dict.get("teacher_latent_cache"):
        lines.append(f"- Teacher: `{args_dict.get('pretrained_teacher_model')}`, its latents precomputed into "
                     f"`{args_dict['teacher_latent_cache']}` (`--teacher_latent_cache`).")
    elif args_dict.get("pretrained_teacher_model"):
        lines.append(f"- Teacher: `{args_dict['pretrained_teacher_model']}`, "
                     f"{args_dict.get('teacher_num_inference_steps', 1)} step(s), "
                     f"guidance {args_dict.get('teacher_guidance_scale', 0.0)}; it turns each prompt into a training latent.")
    data_line = _data_line(args_dict, num_samples)
    if data_line:
        lines.append(data_line)
    if num_processes:
        batch = args_dict.get("train_batch_size", 0) * args_dict.get("gradient_accumulation_steps", 1) * num_processes
        unit = "images" if images else "prompts"
        lines.append(f"- {num_processes} process(es); global batch {batch} {unit} per optimizer step.")
    left_out = TEACHER_SETTINGS if images else IMAGE_SETTINGS
    rows = [f"| `--{key}` | {_format(args_dict[key])} |" for key in SETTINGS
            if args_dict.get(key) is not None and args_dict.get(key) is not False and key not in left_out]
    return "\n".join(lines) + "\n\nSettings (flags of `train_yoso_lora.py`; unset ones left out):\n\n" \
        "| flag | value |\n|---|---|\n" + "\n".join(rows)


def _format(value):
    if value is True:
        return "on"
    if isinstance(value, (list, tuple)):
        return " ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _license_section(base, license, args_dict):
    teacher = None if trains_on_images(args_dict) else args_dict.get("pretrained_teacher_model")
    if license == UNKNOWN_LICENSE:
        text = (f"The license of the base model `{base}` is not in this project's table: the metadata says "
                f"`license: {UNKNOWN_LICENSE}`; set the base model's license before sharing.")
    else:
        text = f"`{license}`, the license of the base model `{base}`."
    if teacher:
        text += f" The training latents were made by the teacher `{teacher}`; check its license terms too."
    elif trains_on_images(args_dict):
        text += " Check the training images' license terms too."
    return "## License\n\n" + text
