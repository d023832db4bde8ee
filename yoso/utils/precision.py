"""fp16 for a step with two optimizers: one gradient scaler for G (accelerate's) and one for D.

accelerate keeps a single GradScaler and calls ``scaler.update()`` after each prepared optimizer's
step. YOSO steps D in the middle of G's micro-step (D's update, then G's backward). With gradient
accumulation, a scale change made by D's ``update()`` (an overflow in D halves the scale; every
``growth_interval`` clean updates double it) would land between G's micro-batches: G's accumulated
gradient would hold earlier micro-batches at the old scale and the last one at the new scale, and
G's unscale would weigh them 2:1. With its own scaler, each optimizer's accumulation window sees one
scale. (The README recipe runs fp16 with accumulation 4, where this matters.)
"""

import torch

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype_for(accelerator):
    """The dtype of the frozen weights under the accelerator's mixed precision (fp32 without it)."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def fp16_error(accelerator):
    """One line saying why this run's fp16 cannot work, or None."""
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        return ("--mixed_precision fp16 needs a GPU: on CPU accelerate gives no fp16 autocast or gradient scaler; "
                "use --mixed_precision bf16 or no")
    return None


def separate_discriminator_scaler(accelerator, optimizer_d):
    """Give D's prepared optimizer a scaler of its own (same settings as accelerate's); None without fp16.

    ``optimizer_d.step()`` then steps and updates that scaler; D's loss must be scaled with it
    (``scaled_backward``). Register the returned scaler for checkpointing.
    """
    if accelerator.scaler is None:
        return None
    scaler = torch.amp.GradScaler(accelerator.device.type)
    scaler.load_state_dict(accelerator.scaler.state_dict())  # init scale, growth/backoff factors, interval
    optimizer_d.scaler = scaler
    return scaler


def scaled_backward(accelerator, loss, scaler):
    """``accelerator.backward(loss)``, but scaled with ``scaler`` when one is given."""
    if scaler is None:
        accelerator.backward(loss)
    else:
        scaler.scale(loss / accelerator.gradient_accumulation_steps).backward()


def place(model, device, dtype):
    """``model.to(device, dtype=dtype)`` for a diffusers model, without the warning diffusers gives on every
    dtype cast ("should be kept in float32: []"), even for models that keep no module in float32 (SD1.5's
    UNet and VAE): for those the cast is exactly torch's. A model that does keep some goes through diffusers."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(device, dtype=dtype)
    return torch.nn.Module.to(model, device, dtype=dtype)
