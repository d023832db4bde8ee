"""What a finished run leaves in ``--output_dir`` (SPEC section 6): the LoRA (the EMA one with ``--use_ema``,
the raw one then in ``non_ema/``), optionally its kohya-format copies, the latent statistics and the model
card; optionally uploaded to the Hub (``yoso.outputs.hub``)."""

from pathlib import Path

from yoso.outputs.kohya import save_kohya_lora
from yoso.data.latent_stats import LATENT_STATS_NAME
from yoso.method.lora import LORA_WEIGHT_NAME, save_lora
from yoso.outputs.model_card import write_model_card
from yoso.outputs.output_files import write_run_files


def save_final_outputs(run, output_dir, latent_stats, args, logger, num_samples=None):
    """Write the final LoRA(s), latent statistics and model card (main process only); returns the paths.
    ``num_samples``: the prompts or images trained on, for the card (None: not known, e.g. a stream)."""
    output_dir = Path(output_dir)
    folders = [output_dir]
    written = []
    if run.ema is not None:
        written.append(save_lora(run.unet_module, output_dir, tensors=run.ema.named_tensors()))
        written.append(save_lora(run.unet_module, output_dir / "non_ema"))
        folders.append(output_dir / "non_ema")
    else:
        written.append(save_lora(run.unet_module, output_dir))
    if args.save_kohya:
        written += [save_kohya_lora(folder) for folder in folders]
    written.append(latent_stats.save(output_dir / LATENT_STATS_NAME))
    # Only these files are this run's: the card and the upload leave out what an earlier run left here.
    write_run_files(output_dir, [Path(p).relative_to(output_dir).as_posix() for p in written])
    written.append(write_model_card(output_dir, vars(args), num_processes=run.accelerator.num_processes,
                                    num_samples=num_samples))
    logger.info(f"LoRA written to {output_dir / LORA_WEIGHT_NAME}"
                + (" (EMA; raw LoRA in non_ema/)" if run.ema is not None else "")
                + (", with kohya-format copies" if args.save_kohya else ""))
    return written
