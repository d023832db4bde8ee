"""Command-line pieces shared by train_yoso_lora.py and precompute_teacher_latents.py: the flags that must
mean the same in both (a cache is only valid for the run whose models and data it was made with), a help
formatter that shows defaults, and a parser whose errors are one line with exit status 2."""

import argparse
import math
import re
from typing import NamedTuple

BAD_INPUT = 2  # exit status of bad input in every script (argparse's convention); a failure during the work: 1


class Range(NamedTuple):
    """The valid values of a numeric flag: ``low`` <= value <= ``high`` (``<`` where the end is open); a float
    must also be finite. ``str()`` says it the way the error line does: ">= 1", "> 0", "in [0, 1)"."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self):
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf and self.low == -math.inf:
            return "any finite number"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x):
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, low_open=True)
SEED = Range(0, 2**32 - 1)  # numpy's seed range (accelerate's set_seed seeds numpy too)
ANY = Range()  # finite

# The valid range of every numeric flag of every script, by its argparse dest; a flag with the same name means
# the same thing (and has the same range) in every script. OneLineErrorParser checks each parsed value against
# it; tests/test_flag_ranges.py checks that no numeric flag of any script is missing here.
NUMERIC_FLAG_RANGES = {
    # data and teacher (yoso.training.cli's shared flags)
    "shuffle_buffer_size": AT_LEAST_1,
    "max_train_samples": AT_LEAST_1,
    "resolution": Range(8),  # the base's VAE/UNet divisibility is checked against its config (checks.py)
    "teacher_num_inference_steps": AT_LEAST_1,
    "teacher_guidance_scale": AT_LEAST_0,
    "dataloader_num_workers": AT_LEAST_0,
    # method (SPEC sections 2 and 4)
    "lambda_con": AT_LEAST_0,
    "lambda_kl": AT_LEAST_0,
    "lambda_adv": AT_LEAST_0,
    "snr_gamma": ABOVE_0,
    "coop_gap": Range(0, 999),  # in timesteps of the 1000-step schedule
    "consistency_gap": Range(0, 999),
    "noise_offset": AT_LEAST_0,
    "input_perturbation": AT_LEAST_0,
    "max_nonfinite_steps": AT_LEAST_1,
    # LoRA and EMA
    "lora_rank": AT_LEAST_1,
    "lora_alpha": ABOVE_0,
    "ema_decay": Range(0, 1, high_open=True),  # 1 would never move the EMA off the initial LoRA
    "ema_inv_gamma": ABOVE_0,
    "ema_power": ABOVE_0,
    "health_window": AT_LEAST_0,  # 0: no warnings
    # optimization
    "seed": SEED,
    "train_batch_size": AT_LEAST_1,
    "num_train_epochs": AT_LEAST_1,
    "max_train_steps": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "learning_rate": ABOVE_0,
    "discriminator_learning_rate": ABOVE_0,
    "lr_warmup_steps": AT_LEAST_0,
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_weight_decay": AT_LEAST_0,
    "adam_epsilon": ABOVE_0,
    "max_grad_norm": ABOVE_0,
    "discriminator_chunks": AT_LEAST_1,  # its argparse type also wants 1 or an even number
    "generator_chunks": AT_LEAST_1,
    # outputs
    "checkpointing_steps": AT_LEAST_1,
    "checkpoints_total_limit": AT_LEAST_1,
    "validation_steps": AT_LEAST_1,
    # precompute_teacher_latents.py
    "shard_size": AT_LEAST_1,
    # prepare_journeydb.py (--max_words >= --min_words is checked after parsing)
    "min_words": AT_LEAST_0,
    "max_words": AT_LEAST_1,
    "max_samples": AT_LEAST_1,
    "val_count": AT_LEAST_0,
    # inference_examples.py and evaluate_yoso.py
    "lora_scale": ANY,  # negative: the LoRA subtracted, as diffusers allows
    "steps": AT_LEAST_1,
    "guidance_scale": AT_LEAST_0,
    "num_images_per_prompt": AT_LEAST_1,
    "ipi_from_samples": AT_LEAST_1,
    "num_prompts": Range(2),  # FID needs two images for a covariance
    "prompt_seed": SEED,
    "batch_size": AT_LEAST_1,
    "fid_resolution": AT_LEAST_1,
    "metrics_batch_size": AT_LEAST_1,
    "grid_prompts": AT_LEAST_1,
}


def out_of_range(parser, namespace):
    """The first parsed numeric value outside its NUMERIC_FLAG_RANGES range, as the one-line error's text
    (flag, value, range); None when all are in range. Defaults are checked too (a None default: not given)."""
    for action in parser._actions:
        valid = NUMERIC_FLAG_RANGES.get(action.dest)
        value = getattr(namespace, action.dest, None)
        if valid is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in valid:
                flag = action.option_strings[-1] if action.option_strings else action.dest
                return f"{flag} {item}: out of range, use a value {valid}"
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help with its default, unless the help already says what the default is."""

    def _get_help_string(self, action):
        if re.search(r"\(default\b|\bdefault:", action.help or "", flags=re.IGNORECASE):
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other bad-input error of the scripts, with exit status 2."""

    def error(self, message):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        problem = out_of_range(self, namespace)
        if problem:
            self.error(problem)
        return namespace, extras


def add_model_arguments(p):
    """The base model and the teacher."""
    p.add_argument("--pretrained_model_name_or_path", default="runwayml/stable-diffusion-v1-5",
                   help="Base model (SD1.5 family): a diffusers folder or hub id. The LoRA is trained on its UNet.")
    p.add_argument("--pretrained_teacher_model", default="stabilityai/sd-turbo",
                   help="Pipeline that turns prompts into training latents (SD-Turbo; SDXL-Turbo's latents are transcoded "
                        "into the base's latent space, see --teacher_latent_transcode).")
    p.add_argument("--teacher_vae", default=None, metavar="PATH",
                   help="A VAE (folder or hub id) that decodes the teacher's latents when they are transcoded, e.g. "
                        "madebyollin/sdxl-vae-fp16-fix for SDXL-Turbo in fp16.")
    p.add_argument("--teacher_latent_transcode", default="auto", choices=["auto", "always", "never"],
                   help="Decode the teacher's latents with its VAE and re-encode them with the base's: 'auto' when the two "
                        "VAEs' configs differ (SDXL-Turbo for SD1.5), 'always', or 'never'.")
    p.add_argument("--revision", default=None, help="Revision of the base model on the Hub (default: the main branch).")
    p.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16 (default: the full-precision files).")
    p.add_argument("--cache_dir", default=None, help="Where downloaded models are cached (default: the Hub cache, ~/.cache/huggingface).")


def add_data_arguments(p):
    """Prompts (for the teacher) or images with captions (for the base VAE), and the resolution."""
    p.add_argument("--train_data", default="train_anno.jsonl",
                   help="Prompt file: .jsonl (an object a line, text in --caption_column), .json (a list of such objects "
                        "or of strings) or .txt (one prompt a line); see prepare_journeydb.py.")
    p.add_argument("--caption_column", default=None,
                   help="Field with the text: in a .jsonl --train_data (default 'prompt'), in an image dataset (default "
                        "'text'), in tar shards (a member extension or .json field, default 'txt').")
    p.add_argument("--dataset_name", default=None,
                   help="Train on images with captions instead of the teacher: a hub dataset or a local folder read by "
                        "`datasets` (the base VAE encodes the images). Default: none, train on --train_data's prompts.")
    p.add_argument("--dataset_config_name", default=None, help="The dataset's configuration, if it has several (default: its only one).")
    p.add_argument("--train_data_dir", default=None,
                   help="Train on images with captions: a folder of images with a metadata.jsonl (datasets' imagefolder; "
                        "prepare_journeydb.py --image_root writes one), or of webdataset .tar shards (streamed). "
                        "Default: none, train on --train_data's prompts.")
    p.add_argument("--image_column", default="image", help="Image column of the dataset (tar shards: 'image' = the first image member).")
    p.add_argument("--center_crop", action="store_true", help="Crop images at the centre (default: a random crop).")
    p.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random (default: never).")
    p.add_argument("--streaming", action="store_true", help="Stream --dataset_name instead of downloading it first (default: download).")
    p.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Samples in the shuffle buffer of a streamed dataset.")
    p.add_argument("--max_train_samples", type=int, default=None, help="Use N prompts or samples drawn with --seed, as diffusers' shuffle(seed).select(range(N)) (default: all).")
    p.add_argument("--resolution", type=int, default=512, help="Image side in pixels (SD1.5: a multiple of 64).")


def add_teacher_arguments(p):
    """How the teacher samples."""
    p.add_argument("--teacher_num_inference_steps", type=int, default=1, help="Steps the teacher takes per latent (SD-Turbo: 1).")
    p.add_argument("--teacher_guidance_scale", type=float, default=0.0, help="The teacher's classifier-free guidance (SD-Turbo: 0, none).")
