"""Command-line pieces shared by train_yoso_lora.py and precompute_teacher_latents.py: the flags that must
mean the same in both (a cache is only valid for the run whose models and data it was made with), a help
formatter that shows defaults, and a parser whose errors are one line with exit status 2."""

import argparse
import re

BAD_INPUT = 2  # exit status of bad input in every script (argparse's convention); a failure during the work: 1


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
