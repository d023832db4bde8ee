"""One YOSO training step (SPEC section 2), shared by ``train_yoso_lora.py`` and the benchmarks.

UNet work per step, with B prompts (default losses):
  teacher     1 UNet pass per teacher step (SD-Turbo: 1)
  G           1 pass with gradient on x_t, 1 pass without on [x_td ; x_tp] (real sample and consistency target)
  F           1 pass with gradient on pred, 1 without on the consistency target (G's encoder half, LoRA off);
              none with --consistency_loss mse; --kl_loss lpl adds x0 to the pass without gradient
  D           1 pass on [real ; fake] in D's update, 1 pass on pred in G's update

Real and fake go through D in one batch, and x_td and x_tp through G in one batch: every layer of both is
per-sample (GroupNorm, attention within a sample), so this is the same computation as two passes, with
fewer kernel launches. F's targets need no graph (the released script runs them under no_grad too), so
they are kept out of F's pass with gradient, whose activations live until the backward.

Non-finite losses: a micro-step whose D or G loss is not finite (on any process) makes that optimizer skip
its update for the accumulation window (as fp16's gradient scaler does on an overflow), and G's skip also
skips the EMA update and the lr schedule; ``--max_nonfinite_steps`` consecutive skipped steps stop the run
(``NonFiniteLossError``). The decision is one collective per optimizer and optimizer step.
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
                 optimizer_g, optimizer_d, lr_scheduler, ema, loss_config, latent_shape, teacher_noise_shape=None,
                 seed=0, noise_offset=0.0,
                 input_perturbation=0.0, max_grad_norm=1.0, max_nonfinite_steps=20, timer=no_timer):
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
        self.input_perturbation = input_perturbation
        self.max_grad_norm = max_grad_norm
        if max_nonfinite_steps < 1:
            raise ValueError(f"--max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.consecutive_nonfinite = 0
        # Whether this process's losses stayed finite since the last optimizer step (no host sync per micro-step).
        self._d_window_ok = torch.ones((), dtype=torch.bool, device=accelerator.device)
        self._g_window_ok = self._d_window_ok.clone()
        self.latent_shape = tuple(latent_shape)
        self.teacher_noise_shape = tuple(teacher_noise_shape or latent_shape)
        self.seed = seed
        self.timer = timer
        self.lora_parameters = [p for p in self.unet_module.parameters() if p.requires_grad]
        self.discriminator_scaler = separate_discriminator_scaler(accelerator, optimizer_d)

    def _all_finite(self, window_ok):
        """Whether every process's losses were finite in this accumulation window: one collective, so all
        ranks take the same decision (one rank skipping an update alone would desynchronise them)."""
        flags = self.accelerator.gather(window_ok.detach().float().reshape(1))
        return bool(flags.min().item() > 0)

    def clean_estimate(self, model, x_t, t, c):
        return self.schedule.clean_estimate(model(x_t, t, c).sample.float(), x_t, t)

    def sample_noise(self, batch_size, generator, device):
        """eps (with --noise_offset), t ~ U{0..T-1} and the noise of x_t (eps, plus --input_perturbation
        times fresh noise), from the step's own generator."""
        eps = torch.randn((batch_size, *self.latent_shape), generator=generator)
        if self.noise_offset:
            eps += self.noise_offset * torch.randn((batch_size, self.latent_shape[0], 1, 1), generator=generator)
        t = torch.randint(0, self.schedule.num_train_timesteps, (batch_size,), generator=generator)
        eps_t = eps
        if self.input_perturbation:
            eps_t = eps + self.input_perturbation * torch.randn(eps.shape, generator=generator)
        return eps.to(device), t.to(device), eps_t.to(device)

    def latents(self, batch, c):
        """x0: the batch's own latents (a cache, or encoded images) or the teacher's, float32."""
        if "latents" in batch:
            return batch["latents"].to(self.accelerator.device, torch.float32)
        seeds = teacher_noise_seeds(self.seed, batch["epoch"], batch["indices"])
        noise = teacher_noise(seeds, self.teacher_noise_shape, self.accelerator.device, c.dtype)
        return self.latent_source(batch["prompts"], noise).float()

    def step(self, batch, generator):
        cfg, accelerator, timer = self.config, self.accelerator, self.timer
        device = accelerator.device
        with accelerator.autocast():
            with timer("teacher"), torch.no_grad():
                c = self.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
                x0 = self.latents(batch, c)

            eps, t, eps_t = self.sample_noise(x0.shape[0], generator, device)
            t_d = self.schedule.earlier(t, cfg.coop_gap)
            t_p = self.schedule.earlier(t, cfg.consistency_gap)
            # One shared eps for all three noisings (--input_perturbation perturbs only x_t's, as released).
            x_t = self.schedule.add_noise(x0, eps_t, t)
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
                self._d_window_ok &= torch.isfinite(loss_d)
                scaled_backward(accelerator, loss_d, self.discriminator_scaler)
                skip_d = accelerator.sync_gradients and not self._all_finite(self._d_window_ok)
                if not skip_d:
                    self.optimizer_d.step()
                self.optimizer_d.zero_grad(set_to_none=True)

            # Generator update.
            loss_con, loss_kl = self.generator_data_losses(pred, target, x0, t, t_p, c)
            with timer("discriminator"):
                # D is frozen here; no checkpointing either, since a recomputation would see D's
                # parameters requiring grad again and save different tensors.
                with frozen(self.discriminator_module), gradient_checkpointing_disabled(self.discriminator_module):
                    logits_pred = self.discriminator_module(pred, t, c)
                loss_adv = generator_adversarial_loss(logits_pred, cfg.gan_loss_reduction)
            loss_g = cfg.lambda_con * loss_con + cfg.lambda_kl * loss_kl + cfg.lambda_adv * loss_adv
            self._g_window_ok &= torch.isfinite(loss_g)

        with timer("backward"):
            accelerator.backward(loss_g)
        grad_norm, skip_g = None, False
        with timer("optimizer"):
            if accelerator.sync_gradients:
                skip_g = not self._all_finite(self._g_window_ok)
                if not skip_g:
                    grad_norm = accelerator.clip_grad_norm_(self.lora_parameters, self.max_grad_norm)
            if not skip_g:
                self.optimizer_g.step()
                self.lr_scheduler.step()
            self.optimizer_g.zero_grad(set_to_none=True)
        with timer("ema"):
            # A skipped G step (a non-finite loss, or an fp16 overflow): the LoRA did not move, nor does its average.
            if (self.ema is not None and accelerator.sync_gradients and not skip_g
                    and not self.optimizer_g.step_was_skipped):
                self.ema.update()

        nonfinite = None
        if accelerator.sync_gradients:
            nonfinite = self._end_window(skip_d, skip_g, loss_d, loss_g)
        return {
            "loss_con": loss_con.detach(),
            "loss_kl": loss_kl.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_d": loss_d.detach(),
            "d_real": logits_real.detach().mean(),
            "d_fake": logits_fake.detach().mean(),
            "grad_norm": grad_norm,
            "nonfinite": nonfinite,
            "x0": x0.detach(),
        }

    def generator_data_losses(self, pred, target, x0, t, t_p, c):
        """L_con (latent perceptual through F, or plain latent MSE) and L_kl (latent MSE, or through F).

        F's inputs other than ``pred`` are targets: they run without a graph, in one batch."""
        cfg, timer = self.config, self.timer
        w_con = self.schedule.consistency_weight(t, t_p, cfg.snr_gamma)
        w_kl = self.schedule.kl_weight(t, cfg.snr_gamma)
        in_features = [name for name, kind in (("target", cfg.consistency_loss), ("x0", cfg.kl_loss)) if kind == "lpl"]
        features = {}
        if in_features:
            with timer("feature_net"):
                features["pred"] = self.feature_net(pred, c)
                with torch.no_grad():
                    inputs = {"target": target, "x0": x0}
                    targets = self.feature_net(torch.cat([inputs[n] for n in in_features]), torch.cat([c] * len(in_features)))
                    features.update(zip(in_features, targets.chunk(len(in_features))))
        if cfg.consistency_loss == "lpl":
            loss_con = consistency_loss(features["pred"], features["target"], w_con)
        else:
            loss_con = consistency_loss(pred, target, w_con)
        if cfg.kl_loss == "lpl":
            loss_kl = data_loss(features["pred"], features["x0"], w_kl, cfg.kl_weighting)
        else:
            loss_kl = data_loss(pred, x0, w_kl, cfg.kl_weighting)
        return loss_con, loss_kl

    def _end_window(self, skip_d, skip_g, loss_d, loss_g):
        """After an optimizer step: reset the window's finiteness, count skips, stop after too many in a row.
        Returns a one-line description of what was skipped, or None."""
        self._d_window_ok = torch.ones((), dtype=torch.bool, device=self.accelerator.device)
        self._g_window_ok = self._d_window_ok.clone()
        if not (skip_d or skip_g):
            self.consecutive_nonfinite = 0
            return None
        self.consecutive_nonfinite += 1
        what = " and ".join(name for name, skipped in (("discriminator", skip_d), ("generator", skip_g)) if skipped)
        description = (f"{what} loss not finite on some process (this one: loss_d {loss_d.item():.4g}, "
                       f"loss_g {loss_g.item():.4g}); its update was skipped")
        if self.consecutive_nonfinite >= self.max_nonfinite_steps:
            raise NonFiniteLossError(f"{what} loss is not finite for {self.consecutive_nonfinite} consecutive steps "
                                     f"(--max_nonfinite_steps {self.max_nonfinite_steps}): {description}")
        return description
