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


# ---- one fp16 copy of an fp32 input shared by the layers that read it --------------------------------------
#
# Under autocast, every linear or conv casts an fp32 input to fp16 and keeps the copy for backward; a cast is
# not shared between layers (autocast caches casts of weights only). A LoRA layer reads its input twice (the
# frozen layer and lora_A) and self-attention three times (to_q, to_k, to_v): after a GroupNorm or LayerNorm,
# which autocast runs in fp32, each of those reads stored its own fp16 copy of the same tensor, and peft casts
# an fp16 input up to fp32 for lora_A, whose autocast then stores one more fp16 copy. Sharing one copy changes
# no value: the forward sees the same fp16 numbers, and each reader's gradient is cast back to fp32 before the
# sum, as autocast's own casts do (``SharedCast``). The memory model (benchmarks/memory_model.py) counts
# 0.9 GiB less at batch 16 with gradient checkpointing and about 3 GiB less without it.

_autocast_override = None  # benchmarks/memory_model.py sets this: its emulated CUDA autocast runs on "meta"


def active_autocast_dtype(device_type):
    """The dtype autocast casts to on ``device_type`` now, or None when autocast is off there."""
    if _autocast_override is not None:
        return _autocast_override(device_type)
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class SharedCast(torch.autograd.Function):
    """``x`` -> ``low`` (``x`` already cast, computed once); backward casts the gradient to ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, low):
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def share_autocast_casts(model):
    """Make the linears and convs of ``model``'s LoRA layers and self-attention modules share one fp16 copy of
    an fp32 input (see above), and keep peft from casting an fp16 input up for lora_A while autocast is on.
    Only while grad is enabled (without grad no copy is kept). Returns the number of scopes hooked."""
    casts, depth = {}, [0]

    def is_lora_layer(module):
        return hasattr(module, "lora_A") and hasattr(module, "base_layer")

    def enter(module, args):
        if is_lora_layer(module):
            x = args[0] if args else None
            # peft's upcast of an fp16 input is undone by autocast at once: skip it (and its fp16 copy)
            module.cast_input_dtype_enabled = not (torch.is_tensor(x) and active_autocast_dtype(x.device.type))
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            casts.clear()

    def share_input(module, args):
        if depth[0] == 0 or not args or not torch.is_tensor(args[0]):
            return None
        x = args[0]
        if x.dtype != torch.float32 or not torch.is_grad_enabled():
            return None
        dtype = active_autocast_dtype(x.device.type)
        if dtype is None or dtype == torch.float32:
            return None
        hit = casts.get(id(x))
        if hit is None or hit[0] is not x:
            with torch.no_grad():
                hit = casts[id(x)] = (x, x.to(dtype))
        return (SharedCast.apply(x, hit[1]), *args[1:])

    scopes, leaves = 0, set()
    for module in model.modules():
        if is_lora_layer(module) or all(hasattr(module, name) for name in ("to_q", "to_k", "to_v")):
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave, always_call=True)
            scopes += 1
            for leaf in module.modules():
                if isinstance(leaf, (torch.nn.Linear, torch.nn.Conv2d)) and id(leaf) not in leaves:
                    leaves.add(id(leaf))
                    leaf.register_forward_pre_hook(share_input)
    return scopes
