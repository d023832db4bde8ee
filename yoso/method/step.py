"""One YOSO training step (SPEC section 2), shared by ``train_yoso_lora.py`` and the benchmarks.

UNet work per step, with B prompts (default losses):
  teacher     1 UNet pass per teacher step (SD-Turbo: 1)
  G           1 pass with gradient on x_t, 1 pass without on [x_td ; x_tp] (real sample and consistency target);
              --step_order discriminator_first: the pass without gradient on [x_t ; x_td ; x_tp]
  F           1 pass with gradient on pred, 1 without on the consistency target (G's encoder half, LoRA off);
              none with --consistency_loss mse; --kl_loss lpl adds x0 to the pass without gradient
  D           1 pass on [real ; fake] in D's update (--discriminator_chunks N: N passes), 1 pass on pred in G's update
              (--generator_chunks N: N passes, and with the batch-mean GAN loss 1 more without gradient)

Real and fake go through D in one batch, and x_td and x_tp through G in one batch: every layer of both is
per-sample (GroupNorm, attention within a sample), so this is the same computation as two passes, with
fewer kernel launches. F's targets need no graph (the released script runs them under no_grad too), so
they are kept out of F's pass with gradient, whose activations live until the backward.

Order (``--step_order``), for peak memory; both compute the same losses and gradients:
  generator_first      (default) G's pass with gradient on x_t first; D's update scores its detached output, so
                       G's whole graph is alive during D's forward and backward on 2B samples.
  discriminator_first  one pass without gradient on [x_t ; x_td ; x_tp] gives the fake, the real sample and the
                       consistency target; D's update; then G's pass with gradient on x_t. One more G pass on B
                       (without a graph), but D's update runs with no G graph alive. The fake then equals ``pred``
                       only up to the rounding of a different batch composition.
``--discriminator_chunks N`` runs D's update in N forward/backward pieces of [real ; fake] (2: real, then fake;
2k: each half in k pieces), so D's graph holds 2B/N samples at a time; the gradient is the same (the softplus of
a batch-mean logit has the per-logit gradient +-sigmoid(+-m)/B; with a half split in pieces, m comes from one
D pass without gradient first).

Staged backward (always on; ``staged_backward=False`` only to compare): G's loss has three parts that reach G
through ``pred``: F's (the consistency and data losses), D's (the adversarial loss) and none else. Each part is
computed on a detached copy of ``pred`` and backpropagated to it as soon as it exists (fp16-scaled and divided
for accumulation by ``accelerator.backward``, as the whole loss would be), which frees F's graph before D's pass
and D's graph before G's backward; G's graph then takes the summed gradient in one backward, so DDP still sees
one backward per forward. Same gradients (autograd sums a tensor's incoming gradients the same way); at batch 16,
512 px with gradient checkpointing and the teacher-latent cache the memory model (``benchmarks/memory_model.py``)
put the step's peak at 17.84 GiB instead of 22.96 when it came in.

Host synchronisation: the step's noise is drawn on the CPU (device-independent and exactly resumable) at its
start, host-to-device copies are pinned and non-blocking on CUDA, and the schedule's tables live on the device;
the step's own waits for the device are the skip decisions below (and, under fp16, the loss scaler's: one per
optimizer step; a fused AdamW under fp16 adds one more for G, to learn whether the scaler skipped its step). The
teacher pipeline's scheduler synchronises on its own; a teacher-latent cache removes it.

Non-finite losses: a micro-step whose D or G loss is not finite (on any process) makes that optimizer skip
its update for the accumulation window (as fp16's gradient scaler does on an overflow), and G's skip also
skips the EMA update and the lr schedule; ``--max_nonfinite_steps`` consecutive skipped steps stop the run
(``NonFiniteLossError``). The decision is one collective per optimizer and optimizer step.
"""

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from yoso.method.health import discriminator_accuracy, gradient_norm
from yoso.method.losses import (consistency_loss, consistency_loss_part, data_loss, data_loss_part,
                                discriminator_loss, generator_adversarial_loss)
from yoso.utils.precision import scaled_backward, separate_discriminator_scaler
from yoso.data.teacher import teacher_noise, teacher_noise_seeds
from yoso.method.unet_encoder import gradient_checkpointing_disabled

STEP_ORDERS = ("generator_first", "discriminator_first")


class NonFiniteLossError(RuntimeError):
    pass


def discriminator_chunks_arg(text):
    """argparse type of --discriminator_chunks: 1, or an even number (each half of [real ; fake] in N/2 pieces)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or (value > 1 and value % 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 (one pass on [real ; fake]) or an even number "
                                         "(2: real, then fake; 2k: each half in k pieces)")
    return value


def step_generator(seed, micro_step, rank):
    """The step's own RNG for eps and t: a function of (seed, micro-step, rank), so resuming is exact and
    validation (which draws from other generators) cannot shift it."""
    return torch.Generator().manual_seed((seed * 7_919 + micro_step * 104_729 + rank * 1_299_709) % (2**63 - 1))


def no_timer(_phase):
    return nullcontext()


def to_device(tensor, device, dtype=None):
    """A CPU tensor onto ``device``: on CUDA through pinned memory without blocking, so the host does not wait
    for the device's queue to drain (a plain copy from pageable memory synchronises the stream)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


def uses_fused_step(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return any(group.get("fused") for group in inner.param_groups)


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
    (``discriminator_scaler``, see ``yoso.utils.precision``); a run must checkpoint it.
    ``step_order``, ``discriminator_chunks`` and ``channels_last`` change where memory peaks and how fast the
    step runs, not what it computes (see the module docstring).
    """

    def __init__(self, accelerator, *, unet, discriminator, feature_net, text_encoder, latent_source, schedule,
                 optimizer_g, optimizer_d, lr_scheduler, ema, loss_config, latent_shape, teacher_noise_shape=None,
                 seed=0, noise_offset=0.0, input_perturbation=0.0, max_grad_norm=1.0, max_nonfinite_steps=20,
                 step_order="generator_first", discriminator_chunks=1, generator_chunks=1, channels_last=False,
                 staged_backward=True, timer=no_timer):
        self.accelerator = accelerator
        self.unet = unet
        self.unet_module = accelerator.unwrap_model(unet)
        self.discriminator = discriminator
        self.discriminator_module = accelerator.unwrap_model(discriminator)
        self.feature_net = feature_net
        self.text_encoder = text_encoder
        self.latent_source = latent_source
        self.schedule = schedule
        schedule.to(accelerator.device)  # its tables indexed by t on the device: no host-to-device copy per use
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
        if step_order not in STEP_ORDERS:
            raise ValueError(f"--step_order must be one of {STEP_ORDERS}, got {step_order!r}")
        if discriminator_chunks < 1 or (discriminator_chunks > 1 and discriminator_chunks % 2):
            raise ValueError(f"--discriminator_chunks must be 1 or even, got {discriminator_chunks}")
        if generator_chunks < 1 or (generator_chunks > 1 and not staged_backward):
            raise ValueError(f"--generator_chunks must be >= 1 (and > 1 needs the staged backward), got {generator_chunks}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.generator_chunks = int(generator_chunks)
        self.step_order = step_order
        self.discriminator_chunks = int(discriminator_chunks)
        self.channels_last = channels_last
        self.staged_backward = bool(staged_backward)
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

    def _layout(self, x):
        """Latents as the models take them: channels-last with ``--channels_last`` (the frozen conv weights are
        stored so; a conv follows its input's layout), else as they are."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def clean_estimate(self, model, x_t, t, c):
        return self.schedule.clean_estimate(model(self._layout(x_t), t, c).sample.float(), x_t, t)

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
        return to_device(eps, device), to_device(t, device), to_device(eps_t, device)

    def latents(self, batch, c):
        """x0: the batch's own latents (a cache, or encoded images) or the teacher's, float32."""
        device = self.accelerator.device
        if "latents" in batch:
            return to_device(batch["latents"], device, torch.float32)
        seeds = teacher_noise_seeds(self.seed, batch["epoch"], batch["indices"])
        noise = to_device(teacher_noise(seeds, self.teacher_noise_shape, "cpu", c.dtype), device)
        return self.latent_source(batch["prompts"], noise, seeds).float()

    def step(self, batch, generator):
        cfg, accelerator, timer = self.config, self.accelerator, self.timer
        device = accelerator.device
        # The random draws first: on the CPU, before any device work is queued (no wait for it).
        eps, t, eps_t = self.sample_noise(batch["input_ids"].shape[0], generator, device)
        with accelerator.autocast():
            with timer("teacher"), torch.no_grad():
                c = self.text_encoder(to_device(batch["input_ids"], device), return_dict=False)[0]
                x0 = self.latents(batch, c)

            t_d = self.schedule.earlier(t, cfg.coop_gap)
            t_p = self.schedule.earlier(t, cfg.consistency_gap)
            # One shared eps for all three noisings (--input_perturbation perturbs only x_t's, as released).
            x_t = self.schedule.add_noise(x0, eps_t, t)
            x_td = self.schedule.add_noise(x0, eps, t_d)
            x_tp = self.schedule.add_noise(x0, eps, t_p)

            if self.step_order == "generator_first":
                with timer("generator"):
                    pred = self.clean_estimate(self.unet, x_t, t, c)
                    with torch.no_grad():
                        real, target = self.clean_estimate(
                            self.unet_module, torch.cat([x_td, x_tp]), torch.cat([t_d, t_p]), torch.cat([c, c])
                        ).chunk(2)
                fake = pred.detach()
            else:
                with timer("generator"), torch.no_grad():
                    fake, real, target = self.clean_estimate(
                        self.unet_module, torch.cat([x_t, x_td, x_tp]), torch.cat([t, t_d, t_p]), torch.cat([c, c, c])
                    ).chunk(3)

            # Discriminator update: real = G's own less-noisy denoising, fake = G's output (detached), both at t.
            with timer("discriminator"):
                logits_real, logits_fake, loss_d = self.discriminator_backward(real, fake, t, c)
                skip_d = accelerator.sync_gradients and not self._all_finite(self._d_window_ok)
                d_grad_norm = None  # before D's update: its gradient as applied (yoso.method.health)
                if accelerator.sync_gradients and not skip_d:
                    d_grad_norm = gradient_norm(self.discriminator_module.parameters(), self.discriminator_scaler)
                if not skip_d:
                    self.optimizer_d.step()
                self.optimizer_d.zero_grad(set_to_none=True)
            del real, fake

            if self.step_order == "discriminator_first":
                with timer("generator"):
                    pred = self.clean_estimate(self.unet, x_t, t, c)

            # Generator update. Staged backward: F's and D's graphs end at a detached copy of pred and are
            # backpropagated to it as soon as each loss exists, so they are never alive together, nor with the
            # other; G's graph then takes their summed gradient in one backward (same gradients, less memory).
            g_input = pred.detach().requires_grad_() if self.staged_backward else pred
            if self.generator_chunks > 1:
                loss_con, loss_kl, loss_adv = self.generator_losses_in_pieces(g_input, target, x0, t, t_p, c)
            else:
                loss_con, loss_kl = self.generator_data_losses(g_input, target, x0, t, t_p, c)
                if self.staged_backward:
                    with timer("feature_net"):
                        self._backward_to_pred(cfg.lambda_con * loss_con + cfg.lambda_kl * loss_kl)
                with timer("adversarial"):
                    # D is frozen here; no checkpointing either, since a recomputation would see D's
                    # parameters requiring grad again and save different tensors.
                    with frozen(self.discriminator_module), gradient_checkpointing_disabled(self.discriminator_module):
                        logits_pred = self.discriminator_module(self._layout(g_input), t, c)
                    loss_adv = generator_adversarial_loss(logits_pred, cfg.gan_loss_reduction)
                    if self.staged_backward:
                        self._backward_to_pred(cfg.lambda_adv * loss_adv)
            loss_g = cfg.lambda_con * loss_con + cfg.lambda_kl * loss_kl + cfg.lambda_adv * loss_adv
            self._g_window_ok &= torch.isfinite(loss_g)

        with timer("backward"):
            if self.staged_backward:
                # The gradient at pred is already scaled (fp16) and divided for accumulation by accelerate.
                pred.backward(g_input.grad)
                del g_input
            else:
                accelerator.backward(loss_g)
        grad_norm, skip_g, overflow = None, False, False
        with timer("optimizer"):
            if accelerator.sync_gradients:
                skip_g = not self._all_finite(self._g_window_ok)
                if not skip_g:
                    grad_norm = accelerator.clip_grad_norm_(self.lora_parameters, self.max_grad_norm)
            if not skip_g:
                overflow = self._generator_optimizer_step()
                if not overflow:
                    self.lr_scheduler.step()
            self.optimizer_g.zero_grad(set_to_none=True)
        with timer("ema"):
            # A skipped G step (a non-finite loss, or an fp16 overflow): the LoRA did not move, nor does its average.
            if self.ema is not None and accelerator.sync_gradients and not skip_g and not overflow:
                self.ema.update()

        nonfinite = None
        if accelerator.sync_gradients:
            nonfinite = self._end_window(skip_d, skip_g, loss_d, loss_g)
        d_accuracy, d_accuracy_real, d_accuracy_fake = discriminator_accuracy(logits_real, logits_fake)
        return {
            "loss_con": loss_con.detach(),
            "loss_kl": loss_kl.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_d": loss_d.detach(),
            "d_real": logits_real.detach().mean(),
            "d_fake": logits_fake.detach().mean(),
            "d_accuracy": d_accuracy,
            "d_accuracy_real": d_accuracy_real,
            "d_accuracy_fake": d_accuracy_fake,
            "grad_norm": grad_norm,
            "d_grad_norm": d_grad_norm,
            "nonfinite": nonfinite,
            "x0": x0.detach(),
        }

    def _backward_to_pred(self, loss):
        """Backward of part of G's loss down to the detached pred only (its graph is then freed), as
        ``accelerator.backward`` scales it: fp16 loss scale and gradient accumulation."""
        with torch.autocast(self.accelerator.device.type, enabled=False):
            self.accelerator.backward(loss)

    def _generator_optimizer_step(self):
        """G's optimizer step; returns whether fp16's loss scaler skipped it (an overflow).

        A fused AdamW takes the scaler's inf flag into its kernel and skips there, so accelerate never sees
        the step skipped (``step_was_skipped`` stays False). The scaler halves its scale exactly when it found
        an inf, so comparing the scale before and after tells, at the cost of one wait for the device."""
        scaler = self.accelerator.scaler
        if not self.accelerator.sync_gradients:  # inside an accumulation window: accelerate does not step
            self.optimizer_g.step()
            return False
        probe = scaler is not None and uses_fused_step(self.optimizer_g)
        scale_before = scaler.get_scale() if probe else None
        self.optimizer_g.step()
        if probe:
            return scaler.get_scale() < scale_before
        return bool(self.optimizer_g.step_was_skipped)

    def discriminator_backward(self, real, fake, t, c):
        """D's loss on [real ; fake] at t and its backward, in ``discriminator_chunks`` pieces.
        Returns (logits_real, logits_fake, loss_d), detached."""
        cfg, accelerator = self.config, self.accelerator
        if self.discriminator_chunks == 1:
            logits = self.discriminator(self._layout(torch.cat([real, fake])), torch.cat([t, t]), torch.cat([c, c]))
            logits_real, logits_fake = logits.chunk(2)
            loss_d = discriminator_loss(logits_real, logits_fake, cfg.gan_loss_reduction)
            self._d_window_ok &= torch.isfinite(loss_d)
            scaled_backward(accelerator, loss_d, self.discriminator_scaler)
            return logits_real.detach(), logits_fake.detach(), loss_d.detach()

        batch = real.shape[0]
        pieces_per_half = self.discriminator_chunks // 2
        split = lambda x: [p for p in torch.tensor_split(x, pieces_per_half) if p.shape[0]]  # noqa: E731
        halves = ((real, -1.0), (fake, 1.0))  # L_D = softplus(-D(real)) + softplus(D(fake))
        batch_means = [None, None]
        if cfg.gan_loss_reduction == "batch" and pieces_per_half > 1:
            # softplus(+-mean_b D) does not split over pieces; its gradient per logit is +-sigmoid(+-m)/B, with m
            # the whole half's mean: one pass without gradient gives m.
            with torch.no_grad():
                batch_means = [torch.cat([self.discriminator_module(self._layout(x), tt, cc)
                                          for x, tt, cc in zip(split(half), split(t), split(c))]).mean()
                               for half, _ in halves]
        logits = []
        total, done = 2 * len(split(t)), 0
        for (half, sign), mean in zip(halves, batch_means):
            collected = []
            for x, tt, cc in zip(split(half), split(t), split(c)):
                done += 1
                # Gradients are exchanged between processes once, after the last piece.
                with nullcontext() if done == total else accelerator.no_sync(self.discriminator):
                    out = self.discriminator(self._layout(x), tt, cc)
                    scaled_backward(accelerator, self._piece_loss(out, sign, batch, mean), self.discriminator_scaler)
                collected.append(out.detach())
            logits.append(torch.cat(collected))
        logits_real, logits_fake = logits
        loss_d = discriminator_loss(logits_real, logits_fake, cfg.gan_loss_reduction)
        self._d_window_ok &= torch.isfinite(loss_d)
        return logits_real, logits_fake, loss_d

    def _piece_loss(self, logits, sign, batch, batch_mean):
        """The part of L_D whose gradient w.r.t. these logits is L_D's: softplus(sign * D) summed over the piece
        / B ("sample"); softplus(sign * mean D) when the piece is the whole half ("batch"); else the linear form
        sum(sign * sigmoid(sign * m) * D) / B with m the half's mean (same gradient, not the same value)."""
        logits = logits.float()
        if self.config.gan_loss_reduction == "sample":
            return F.softplus(sign * logits).sum() / batch
        if batch_mean is None:
            return F.softplus(sign * logits.mean())
        return (sign * torch.sigmoid(sign * batch_mean.float()) * logits).sum() / batch

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
                features["pred"] = self.feature_net(self._layout(pred), c)
                with torch.no_grad():
                    inputs = {"target": target, "x0": x0}
                    targets = self.feature_net(self._layout(torch.cat([inputs[n] for n in in_features])),
                                               torch.cat([c] * len(in_features)))
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

    def generator_losses_in_pieces(self, pred, target, x0, t, t_p, c):
        """G's three losses on its detached output ``pred``, F's and D's passes in ``generator_chunks`` pieces of
        the batch, each piece backpropagated to ``pred`` at once: F's and D's graphs hold B/N samples at a time.
        Same gradients: the consistency and data losses are sums over samples / B; the batch-mean logit's
        softplus has the per-logit gradient -sigmoid(-m)/B, with m from one D pass without gradient first (as in
        D's update in pieces). Returns (loss_con, loss_kl, loss_adv), detached; the first two are their pieces'
        sum, equal to the whole batch's up to summation order."""
        cfg, timer, batch = self.config, self.timer, pred.shape[0]
        base, extra = divmod(batch, self.generator_chunks)
        ends = torch.tensor([base + (i < extra) for i in range(self.generator_chunks)]).cumsum(0).tolist()
        pieces = [slice(a, b) for a, b in zip([0] + ends[:-1], ends) if b > a]
        w_con = self.schedule.consistency_weight(t, t_p, cfg.snr_gamma)
        w_kl = self.schedule.kl_weight(t, cfg.snr_gamma)
        in_features = [name for name, kind in (("target", cfg.consistency_loss), ("x0", cfg.kl_loss)) if kind == "lpl"]
        refs = {"target": target, "x0": x0}  # latent-space references, or F's features of them
        loss_con = loss_kl = 0.0
        with timer("feature_net"):
            if in_features:
                with torch.no_grad():
                    features = self.feature_net(self._layout(torch.cat([refs[n] for n in in_features])),
                                                torch.cat([c] * len(in_features)))
                refs.update(zip(in_features, features.chunk(len(in_features))))
            for piece in pieces:
                x = pred[piece]
                features = self.feature_net(self._layout(x), c[piece]) if in_features else None
                con = consistency_loss_part(features if cfg.consistency_loss == "lpl" else x, refs["target"][piece],
                                            w_con[piece], batch)
                kl = data_loss_part(features if cfg.kl_loss == "lpl" else x, refs["x0"][piece], w_kl[piece],
                                    w_kl.mean(), batch, cfg.kl_weighting)
                self._backward_to_pred(cfg.lambda_con * con + cfg.lambda_kl * kl)
                loss_con, loss_kl = loss_con + con.detach(), loss_kl + kl.detach()
        with timer("adversarial"), frozen(self.discriminator_module), \
                gradient_checkpointing_disabled(self.discriminator_module):
            mean = None
            if cfg.gan_loss_reduction == "batch":
                # On pred.detach(): a no-grad view of a leaf that requires grad trips torch's ModuleTracker
                # (FlopCounterMode, the benchmark's FLOP count); same values.
                with torch.no_grad():
                    mean = torch.cat([self.discriminator_module(self._layout(pred.detach()[piece]), t[piece], c[piece])
                                      for piece in pieces]).mean()
            logits = []
            for piece in pieces:
                out = self.discriminator_module(self._layout(pred[piece]), t[piece], c[piece])
                self._backward_to_pred(cfg.lambda_adv * self._piece_loss(out, -1.0, batch, mean))
                logits.append(out.detach())
            loss_adv = generator_adversarial_loss(torch.cat(logits), cfg.gan_loss_reduction)
        return loss_con, loss_kl, loss_adv

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
