"""One YOSO training step (SPEC section 2), shared by ``train_yoso_lora.py`` and the benchmarks.

UNet work per step, with B prompts:
  teacher     1 UNet pass per teacher step (SD-Turbo: 1)
  G           1 pass with gradient on x_t, 1 pass without on [x_td ; x_tp] (real sample and consistency target)
  F           1 pass on [pred ; target] (G's encoder half, LoRA off)
  D           1 pass on [real ; fake] in D's update, 1 pass on pred in G's update

Real and fake go through D in one batch, and pred and target through F in one batch: every layer of
both is per-sample (GroupNorm, attention within a sample), so this is the same computation as two
passes, with fewer kernel launches.
"""

from contextlib import contextmanager, nullcontext

import torch

from .losses import consistency_loss, data_loss, discriminator_loss, generator_adversarial_loss
from .precision import scaled_backward, separate_discriminator_scaler
from .teacher import teacher_noise, teacher_noise_seeds
from .unet_encoder import gradient_checkpointing_disabled


class NonFiniteLossError(RuntimeError):
    pass


def step_generator(seed, micro_step, rank):
    """The step's own RNG for eps and t: a function of (seed, micro-step, rank), so resuming is exact and
    validation (which draws from other generators) cannot shift it."""
    return torch.Generator().manual_seed((seed * 7_919 + micro_step * 104_729 + rank * 1_299_709) % (2**63 - 1))


def no_timer(_phase):
    return nullcontext()


@contextmanager
def frozen(module):
    """Parameters of ``module`` stop requiring grad inside the block (D while it scores G's output)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class YOSOTrainingStep:
    """Holds the models and optimizers; ``step(batch, generator)`` runs one micro-step and returns logs.

    ``unet`` and ``discriminator`` are what ``accelerator.prepare`` returned (DDP-wrapped when distributed).
    The passes that must not touch DDP's gradient bookkeeping (no-grad passes, F, D scoring G's output)
    use the unwrapped modules. Under fp16, D's optimizer gets its own gradient scaler
    (``discriminator_scaler``, see ``yoso.precision``); a run must checkpoint it.
    """

    def __init__(self, accelerator, *, unet, discriminator, feature_net, text_encoder, latent_source, schedule,
                 optimizer_g, optimizer_d, lr_scheduler, ema, loss_config, latent_shape, seed=0, noise_offset=0.0,
                 max_grad_norm=1.0, timer=no_timer):
        self.accelerator = accelerator
        self.unet = unet
        self.unet_module = accelerator.unwrap_model(unet)
        self.discriminator = discriminator
        self.discriminator_module = accelerator.unwrap_model(discriminator)
        self.feature_net = feature_net
        self.text_encoder = text_encoder
        self.latent_source = latent_source
        self.schedule = schedule
        self.optimizer_g = optimizer_g
        self.optimizer_d = optimizer_d
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.config = loss_config
        self.noise_offset = noise_offset
        self.max_grad_norm = max_grad_norm
        self.latent_shape = tuple(latent_shape)
        self.seed = seed
        self.timer = timer
        self.lora_parameters = [p for p in self.unet_module.parameters() if p.requires_grad]
        self.discriminator_scaler = separate_discriminator_scaler(accelerator, optimizer_d)

    def _check_finite(self, name, value):
        # All ranks must take the same decision, or one would wait forever in the next collective.
        values = self.accelerator.gather(value.detach().float().reshape(1))
        if not torch.isfinite(values).all():
            raise NonFiniteLossError(f"{name} is not finite ({values.tolist()})")

    def clean_estimate(self, model, x_t, t, c):
        return self.schedule.clean_estimate(model(x_t, t, c).sample.float(), x_t, t)

    def sample_noise(self, batch_size, generator, device):
        """eps (with --noise_offset) and t ~ U{0..T-1}, from the step's own generator."""
        eps = torch.randn((batch_size, *self.latent_shape), generator=generator)
        if self.noise_offset:
            eps += self.noise_offset * torch.randn((batch_size, self.latent_shape[0], 1, 1), generator=generator)
        t = torch.randint(0, self.schedule.num_train_timesteps, (batch_size,), generator=generator)
        return eps.to(device), t.to(device)

    def step(self, batch, generator):
        cfg, accelerator, timer = self.config, self.accelerator, self.timer
        device = accelerator.device
        with accelerator.autocast():
            with timer("teacher"), torch.no_grad():
                input_ids = batch["input_ids"].to(device)
                c = self.text_encoder(input_ids, return_dict=False)[0]
                if "latents" in batch:  # precomputed teacher latents (cache)
                    x0 = batch["latents"].to(device, torch.float32)
                else:
                    seeds = teacher_noise_seeds(self.seed, batch["epoch"], batch["indices"])
                    noise = teacher_noise(seeds, self.latent_shape, device, c.dtype)
                    x0 = self.latent_source(batch["prompts"], noise).float()

            eps, t = self.sample_noise(x0.shape[0], generator, device)
            t_d = self.schedule.earlier(t, cfg.coop_gap)
            t_p = self.schedule.earlier(t, cfg.consistency_gap)
            # One shared eps for all three noisings.
            x_t = self.schedule.add_noise(x0, eps, t)
            x_td = self.schedule.add_noise(x0, eps, t_d)
            x_tp = self.schedule.add_noise(x0, eps, t_p)

            with timer("generator"):
                pred = self.clean_estimate(self.unet, x_t, t, c)
                with torch.no_grad():
                    real, target = self.clean_estimate(
                        self.unet_module, torch.cat([x_td, x_tp]), torch.cat([t_d, t_p]), torch.cat([c, c])
                    ).chunk(2)

            # Discriminator update: real = G's own less-noisy denoising, fake = pred (detached), both at t.
            with timer("discriminator"):
                logits = self.discriminator(torch.cat([real, pred.detach()]), torch.cat([t, t]), torch.cat([c, c]))
                logits_real, logits_fake = logits.chunk(2)
                loss_d = discriminator_loss(logits_real, logits_fake, cfg.gan_loss_reduction)
                self._check_finite("discriminator loss", loss_d)
                scaled_backward(accelerator, loss_d, self.discriminator_scaler)
                self.optimizer_d.step()
                self.optimizer_d.zero_grad(set_to_none=True)

            # Generator update.
            with timer("feature_net"):
                features_pred, features_target = self.feature_net(torch.cat([pred, target]), torch.cat([c, c])).chunk(2)
                w_con = self.schedule.consistency_weight(t, t_p, cfg.snr_gamma)
                loss_con = consistency_loss(features_pred, features_target.detach(), w_con)
            loss_kl = data_loss(pred, x0, self.schedule.kl_weight(t, cfg.snr_gamma))
            with timer("discriminator"):
                # D is frozen here; no checkpointing either, since a recomputation would see D's
                # parameters requiring grad again and save different tensors.
                with frozen(self.discriminator_module), gradient_checkpointing_disabled(self.discriminator_module):
                    logits_pred = self.discriminator_module(pred, t, c)
                loss_adv = generator_adversarial_loss(logits_pred, cfg.gan_loss_reduction)
            loss_g = cfg.lambda_con * loss_con + cfg.lambda_kl * loss_kl + cfg.lambda_adv * loss_adv
            self._check_finite("generator loss", loss_g)

        with timer("backward"):
            accelerator.backward(loss_g)
        grad_norm = None
        with timer("optimizer"):
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(self.lora_parameters, self.max_grad_norm)
            self.optimizer_g.step()
            self.lr_scheduler.step()
            self.optimizer_g.zero_grad(set_to_none=True)
        with timer("ema"):
            # An fp16 overflow skips G's step; the LoRA did not move, so neither does its average.
            if self.ema is not None and accelerator.sync_gradients and not self.optimizer_g.step_was_skipped:
                self.ema.update()

        return {
            "loss_con": loss_con.detach(),
            "loss_kl": loss_kl.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_d": loss_d.detach(),
            "d_real": logits_real.detach().mean(),
            "d_fake": logits_fake.detach().mean(),
            "grad_norm": grad_norm,
            "x0": x0.detach(),
        }
