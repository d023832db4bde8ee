"""What a finished run leaves in ``--output_dir`` (SPEC section 6): the LoRA (the EMA one with ``--use_ema``,
the raw one then in ``non_ema/``), the latent statistics, and optionally a Hub upload."""

from pathlib import Path

from .latent_stats import LATENT_STATS_NAME
from .lora import LORA_WEIGHT_NAME, save_lora

HUB_IGNORE_PATTERNS = ["checkpoint-*", "*.incomplete", "logs/*"]


def save_final_outputs(run, output_dir, latent_stats, logger):
    """Write the final LoRA(s) and latent statistics (main process only); returns the written paths."""
    output_dir = Path(output_dir)
    written = []
    if run.ema is not None:
        written.append(save_lora(run.unet_module, output_dir, tensors=run.ema.named_tensors()))
        written.append(save_lora(run.unet_module, output_dir / "non_ema"))
    else:
        written.append(save_lora(run.unet_module, output_dir))
    written.append(latent_stats.save(output_dir / LATENT_STATS_NAME))
    logger.info(f"LoRA written to {output_dir / LORA_WEIGHT_NAME}"
                + (" (EMA; raw LoRA in non_ema/)" if run.ema is not None else ""))
    return written


def push_to_hub(output_dir, hub_model_id=None, hub_token=None):
    from huggingface_hub import create_repo, upload_folder

    output_dir = Path(output_dir)
    repo_id = create_repo(hub_model_id or output_dir.name, exist_ok=True, token=hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=hub_token, ignore_patterns=HUB_IGNORE_PATTERNS,
                  commit_message="YOSO-LoRA")
    return repo_id
