#!/usr/bin/env python
"""Memory model of one YOSO training step: the bytes a CUDA fp16 run holds, counted on the CPU in seconds.

The project's own step (``yoso.method.step.YOSOTrainingStep``, built by the training script's builder) runs on
tensors that have shapes but no data (the ``meta`` device). Two modes stand in for what a CUDA run would do:

* ``CudaAutocast`` (a ``TorchFunctionMode``) applies CUDA's fp16 autocast rules where ``accelerator.autocast()``
  is active: matmuls, convolutions, linear layers and attention run in fp16 (their inputs cast, the casts kept
  for backward as autocast keeps them; a trainable weight's fp16 copy cached until the region ends, as torch's
  autocast cache does), normalisations, softmax, reductions and losses in fp32. Attention is
  counted as CUDA's flash kernel holds it (output + an fp32 logsumexp, B x heads x N), not as a B x heads x N x N
  score matrix: the meta device has no flash kernel, so the CPU flash kernel's meta function stands in.
* ``MemoryCounter`` (a ``TorchDispatchMode``) adds every new tensor storage's bytes, rounded to the CUDA caching
  allocator's 512-byte blocks, when an operation returns it, and subtracts them when the storage dies. Its peak
  is what ``torch.cuda.max_memory_allocated`` reports, per phase of the step (the step's own ``timer``) and
  overall, with the largest groups of live tensors at the peak.

What it leaves out (the calibration in ``benchmarks/results/memory_model_sd15.md`` measures the sum): cuBLAS /
cuDNN workspaces, the fp16 loss scalers' small tensors, the allocator's fragmentation (not in
``max_memory_allocated``), the CUDA context (not in it either). The teacher's sampling loop runs as one forward
of its text encoder and UNet (one teacher step, as the recipe); its scheduler arithmetic is not modeled.

    python benchmarks/memory_model.py --batch_size 4 16 --gradient_checkpointing off on --cache off on
    python benchmarks/memory_model.py --calibrate      # the H200 rows: writes benchmarks/results/memory_model_sd15.*
"""

import argparse
import contextlib
import json
import os
import sys
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from yoso.utils import precision  # noqa: E402

GIB = 1 << 30
BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes
H200_JSON = REPO / "benchmarks/results/2026-11-30-h200/bench_sd15_h200.json"
RESULTS = REPO / "benchmarks/results/memory_model_sd15"
# The published recipe's per-GPU shape (SPEC section 4).
RECIPE_SHAPE = {"config": "sd15", "resolution": 512, "lora_rank": 64}


# ---- counting -----------------------------------------------------------------------------------------

def storage_bytes(nbytes):
    return -(-nbytes // BLOCK) * BLOCK if nbytes else 0


class MemoryCounter(TorchDispatchMode):
    """Live bytes of every tensor storage created under it (and of those registered with ``adopt``), the running
    peak, and per-label totals at the peak. A label says what made a storage: an op, or a resident category."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.window_peak = 0
        self.labels = {}       # storage key -> (label, bytes)
        self.label = "activation"
        self.at_peak = {}
        self._snapshot_at = 0

    def _add(self, storage, label):
        key = storage._cdata
        if key in self.labels:
            return
        nbytes = storage_bytes(storage.nbytes())
        self.labels[key] = (label, nbytes)
        self.live += nbytes
        weakref.finalize(storage, self._free, key)
        if self.live > self.window_peak:
            self.window_peak = self.live
        if self.live > self.peak:
            self.peak = self.live
            # a snapshot when the peak grew by 0.5% or more: cheap, and the last one is within 0.5% of the peak
            if self.peak > self._snapshot_at * 1.005:
                self._snapshot_at = self.peak
                self.at_peak = self.by_label()

    def _free(self, key):
        _, nbytes = self.labels.pop(key, (None, 0))
        self.live -= nbytes

    def adopt(self, tensor, label):
        """Count an existing tensor (weights, optimizer states) under ``label``."""
        if torch.is_tensor(tensor):
            self._add(tensor.untyped_storage(), label)

    def relabel(self, tensor, label):
        key = tensor.untyped_storage()._cdata
        if key in self.labels:
            self.labels[key] = (label, self.labels[key][1])

    def by_label(self):
        totals = {}
        for label, nbytes in self.labels.values():
            totals[label] = totals.get(label, 0) + nbytes
        return totals

    def new_window(self):
        self.window_peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self._add(t.untyped_storage(), f"{self.label}: {name}")
        return out


# ---- CUDA autocast on the meta device -----------------------------------------------------------------

_FP16_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
             torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.einsum}
_FP32_OPS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
             F.mse_loss, F.softplus, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
             torch.sum, torch.Tensor.sum, torch.norm, torch.Tensor.norm, F.normalize, torch.rsqrt, torch.Tensor.rsqrt,
             torch.log, torch.cumsum, F.cross_entropy, F.binary_cross_entropy_with_logits}


def _cast(value, dtype, cache=None):
    """CUDA autocast's cast: floating tensors to ``dtype``; a leaf that requires grad (a trainable weight) is
    cast once per autocast region and the copy reused (``cache``), as torch's autocast cache does."""
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
        # (not under no_grad: a copy made there has no graph, and torch does not reuse it for a pass with one)
        if cache is not None and value.is_leaf and value.requires_grad and dtype == torch.float16 \
                and torch.is_grad_enabled():
            key = id(value)
            if key not in cache or cache[key][0] is not value:
                cache[key] = (value, value.to(dtype))
            return cache[key][1]
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype, cache) for v in value)
    return value


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as CUDA's flash kernel holds it: fp16 output and an fp32 logsumexp saved for backward."""
    if attn_mask is not None:  # SD1.5's attention has no mask; the memory-efficient kernel would take one
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)[0]


class CudaAutocast(TorchFunctionMode):
    """CUDA fp16 autocast's casting rules, applied at the Python API (so autograd saves the casts)."""

    active = []  # the modes entered, innermost last (``torch.autocast(..., enabled=False)`` switches it off)

    def __init__(self, dtype=torch.float16, region=True):
        super().__init__()
        self.dtype = dtype
        self.enabled = True
        # A region (``accelerator.autocast()``, a checkpoint's recomputation) keeps the fp16 copies of trainable
        # weights until it ends, as torch's autocast cache does; the wrapper around the whole step is no region.
        self.cache = {} if region else None

    def _cache(self):
        for mode in reversed(CudaAutocast.active):
            if mode.cache is not None:
                return mode.cache
        return None

    def __enter__(self):
        CudaAutocast.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        CudaAutocast.active.pop()
        if self.cache is not None:
            self.cache.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        cache = self._cache()
        if func is F.scaled_dot_product_attention:
            return flash_attention(*_cast(args, self.dtype), **{k: _cast(v, self.dtype) for k, v in kwargs.items()})
        if func in _FP16_OPS:
            return func(*_cast(args, self.dtype, cache), **{k: _cast(v, self.dtype, cache) for k, v in kwargs.items()})
        if func in _FP32_OPS:
            return func(*_cast(args, torch.float32), **{k: _cast(v, torch.float32) for k, v in kwargs.items()})
        return func(*args, **kwargs)


_torch_autocast = torch.autocast


def emulated_autocast_dtype(device_type):
    """``yoso.utils.precision.active_autocast_dtype`` under the emulation: fp16 while it is on."""
    mode = CudaAutocast.active[-1] if CudaAutocast.active else None
    return mode.dtype if mode is not None and mode.enabled else None


@contextlib.contextmanager
def _switch(enabled):
    mode = CudaAutocast.active[-1] if CudaAutocast.active else None
    before = mode.enabled if mode else None
    if mode:
        mode.enabled = enabled
    try:
        yield
    finally:
        if mode:
            mode.enabled = before


def meta_aware_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
    """``torch.autocast`` for code that turns autocast off on its tensors' device (D's head keeps fp32): on
    ``meta`` it switches the emulated CUDA autocast instead."""
    if device_type == "meta":
        return _switch(enabled)
    return _torch_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


_torch_checkpoint = torch.utils.checkpoint.checkpoint


def checkpoint_under_autocast(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` whose recomputation runs under the emulated autocast, as CUDA's
    re-enters the autocast state it saw: the recomputation runs inside backward, where the autograd engine has
    no function modes on (and checkpoint re-enters autocast only for devices that have it, not ``meta``)."""
    def under_autocast(*a, **k):
        # in the forward, inside the step's autocast region (its cache holds); in the recomputation, a region
        recompute = not any(mode.cache is not None for mode in CudaAutocast.active)
        with CudaAutocast(region=recompute):
            return function(*a, **k)
    return _torch_checkpoint(under_autocast, *args, **kwargs)


# ---- the run on the meta device ----------------------------------------------------------------------

def meta_accelerator():
    """An Accelerator whose device is ``meta`` and which places nothing (meta tensors cannot be copied out);
    ``autocast()`` is CUDA's fp16 autocast, emulated."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    class MetaAccelerator(Accelerator):
        @property
        def device(self):
            return torch.device("meta")

        def autocast(self, *args, **kwargs):
            return CudaAutocast()

        def gather(self, tensor):
            return tensor

    # accelerate's state is a process singleton: a model run after another Accelerator in the same process
    # (a notebook, a test worker) must not inherit that one's mixed precision, or refuse to start.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return MetaAccelerator(cpu=True, device_placement=False, mixed_precision="no")


def label_resident(counter, run):
    """Name every storage alive after the build: frozen weights, trainable weights, optimizer states, EMA."""
    trainable = {id(p) for p in run.unet_module.parameters() if p.requires_grad}
    for module, owner in ((run.models.text_encoder, "base text encoder"), (run.models.vae, "base VAE"),
                          (run.unet_module, "base UNet"), (run.discriminator_module, "discriminator")):
        for p in module.parameters():
            kind = "trainable fp32" if (id(p) in trainable or owner == "discriminator") else "frozen fp16"
            counter.relabel(p, f"weights: {owner} ({kind})" if owner != "base UNet" or id(p) not in trainable
                            else "weights: LoRA (trainable fp32)")
    source = run.models.latent_source
    if source is not None:
        for p in source.pipeline.unet.parameters():
            counter.relabel(p, "weights: teacher (frozen fp16)")
        for p in source.pipeline.text_encoder.parameters():
            counter.relabel(p, "weights: teacher (frozen fp16)")
        for p in source.pipeline.vae.parameters():
            counter.relabel(p, "weights: teacher (frozen fp16)")
    for name, optimizer in (("G", run.optimizer_g), ("D", run.optimizer_d)):
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    counter.relabel(value, f"Adam states ({name})")
    if run.ema is not None:
        for value in vars(run.ema).values():
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if torch.is_tensor(t):
                    counter.relabel(t, "EMA of the LoRA")


class PhasePeaks:
    """The step's ``timer``: the counter's peak inside each phase (between phases counts as "other")."""

    def __init__(self, counter):
        self.counter = counter
        self.peaks = {}

    def _fold(self, phase):
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.counter.window_peak)
        self.counter.new_window()

    @contextlib.contextmanager
    def __call__(self, phase):
        self._fold("other")
        self.counter.label = f"activation ({phase})"
        try:
            yield
        finally:
            self._fold(phase)
            self.counter.label = "activation (other)"


def teacher_stand_in(pipeline, latent_shape):
    """One teacher step's memory: its text encoder and UNet forward without a graph, then x0 (the scheduler's
    arithmetic is not modeled). Returns a callable ``(prompts, noise) -> x0`` like ``TeacherLatents``."""
    from yoso.testing import make_clip_tokenizer  # noqa: F401  (kept for parity with the real source's inputs)

    def source(prompts, noise, *seeds):
        with torch.no_grad():
            ids = torch.zeros((noise.shape[0], 77), dtype=torch.long, device=noise.device)
            c = pipeline.text_encoder(ids, return_dict=False)[0]
            t = torch.full((noise.shape[0],), 999, dtype=torch.long, device=noise.device)
            eps = pipeline.unet(noise.to(pipeline.unet.dtype), t, c).sample
            return (noise - eps).to(noise.dtype)
    return source


def model_step(config="sd15", batch_size=16, gradient_checkpointing=True, teacher_latent_cache=False,
               resolution=None, lora_rank=None, steps=2, **flags):
    """Run ``steps`` training steps of ``config`` on the meta device and return the last one's memory:
    ``peak_bytes`` (resident + transient, as ``max_memory_allocated``), ``resident_bytes`` (before the step),
    ``phases`` (peak per phase), ``resident`` and ``at_peak`` (bytes per label)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train_step as bench

    spec, _ = bench.load_config(config)
    resolution = resolution or spec["resolution"]
    lora_rank = lora_rank or spec.get("lora_rank", 64)
    counter = MemoryCounter()
    start = time.perf_counter()
    torch.autocast = meta_aware_autocast
    precision._autocast_override = emulated_autocast_dtype  # the step's shared casts see the emulated autocast
    torch.utils.checkpoint.checkpoint = checkpoint_under_autocast  # before the models are built: they bind it
    with counter, contextlib.ExitStack() as restore:
        restore.callback(setattr, torch, "autocast", _torch_autocast)
        restore.callback(setattr, precision, "_autocast_override", None)
        restore.callback(setattr, torch.utils.checkpoint, "checkpoint", _torch_checkpoint)
        accelerator = meta_accelerator()
        from yoso.training.builder import build_run

        parts = bench.build_parts(spec, "meta", torch.float16, with_teacher=not teacher_latent_cache)
        settings = bench.run_settings(spec, resolution, lora_rank, 1, use_ema=True, learning_rate=1e-5, seed=0,
                                      **flags)
        run = build_run(settings, accelerator, num_training_steps=steps + 1, parts=parts, weight_dtype=torch.float16)
        bench.set_gradient_checkpointing([run.unet_module, run.discriminator_module,
                                          run.models.feature_net.encoder], gradient_checkpointing)
        trainer = run.trainer
        trainer._all_finite = lambda window_ok: True  # a host read of one flag: no memory, impossible on meta
        latent_shape = trainer.latent_shape
        if run.models.latent_source is not None:
            trainer.latent_source = teacher_stand_in(run.models.latent_source.pipeline, latent_shape)
        timer = PhasePeaks(counter)
        trainer.timer = timer
        generator = torch.Generator().manual_seed(0)
        for index in range(steps):
            batch = {"input_ids": torch.zeros((batch_size, 77), dtype=torch.long),
                     "prompts": ["a prompt"] * batch_size, "epoch": 0,
                     "indices": list(range(index * batch_size, (index + 1) * batch_size))}
            if teacher_latent_cache:
                batch["latents"] = torch.empty((batch_size, *latent_shape), device="meta", dtype=torch.float16)
            if index == steps - 1:  # the measured step: everything alive now is resident
                label_resident(counter, run)
                resident = counter.by_label()
                resident_bytes = counter.live
                counter.peak = counter.window_peak = counter.live
                counter._snapshot_at = 0
                counter.at_peak = resident
                timer.peaks = {}
            counter.label = "activation (other)"
            # Autocast for the whole step, so that gradient checkpointing's recomputation (in backward) runs
            # under it as it does on CUDA; optimizer and EMA ops are on no autocast list, so nothing else changes.
            with CudaAutocast(region=False):
                trainer.step(batch, generator)
            del batch
        result = {
            "config": config, "batch_size": batch_size, "resolution": resolution, "lora_rank": lora_rank,
            "gradient_checkpointing": bool(gradient_checkpointing), "teacher_latent_cache": bool(teacher_latent_cache),
            "flags": flags, "peak_bytes": counter.peak, "resident_bytes": resident_bytes,
            "phases": dict(sorted(timer.peaks.items(), key=lambda kv: -kv[1])),
            "resident": dict(sorted(resident.items(), key=lambda kv: -kv[1])),
            "at_peak": dict(sorted(counter.at_peak.items(), key=lambda kv: -kv[1])[:12]),
            "seconds": round(time.perf_counter() - start, 1),
        }
        del trainer, run, parts
    return result


def describe(result, measured=None):
    lines = [f"{result['config']} batch {result['batch_size']}, gradient checkpointing "
             f"{'on' if result['gradient_checkpointing'] else 'off'}, cache {'on' if result['teacher_latent_cache'] else 'off'}"
             f"{', ' + str(result['flags']) if result['flags'] else ''}: modeled peak {result['peak_bytes'] / GIB:.2f} GiB"
             + (f" (measured {measured / GIB:.2f}, {result['peak_bytes'] / measured:.3f}x)" if measured else "")
             + f", resident {result['resident_bytes'] / GIB:.2f} GiB ({result['seconds']} s)"]
    lines.append("  phase peaks: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in result["phases"].items()))
    lines.append("  at the peak: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in list(result["at_peak"].items())[:8]))
    return "\n".join(lines)


# ---- tables ------------------------------------------------------------------------------------------

CARDS_GB = (12, 16, 24, 40, 80)
CONTEXT_GIB = 1.0  # the CUDA context and cuDNN/cuBLAS handles, outside max_memory_allocated (about 0.5-1 GiB)


NOT_FLAGS = ("staged_backward", "share_autocast_casts")  # settings, not flags: off only for the code measured


def row_of(result, name, measured=None):
    """One row of the results file; the flags are the training script's (``NOT_FLAGS`` are not flags:
    off only in the calibration rows, which model the code measured before it existed)."""
    row = {"name": name, "batch_size": result["batch_size"], "gradient_checkpointing": result["gradient_checkpointing"],
           "teacher_latent_cache": result["teacher_latent_cache"],
           "flags": flag_text(result["flags"]),
           "staged_backward": result["flags"].get("staged_backward", True),
           "share_autocast_casts": result["flags"].get("share_autocast_casts", True),
           "modeled_peak_bytes": result["peak_bytes"], "modeled_resident_bytes": result["resident_bytes"],
           "modeled_phase_peak_bytes": result["phases"], "modeled_at_peak_bytes": result["at_peak"]}
    if measured is not None:
        row["measured_peak_bytes"] = measured["peak_memory"]
        row["measured_resident_bytes"] = measured["resident_memory"]
        row["modeled_over_measured"] = round(result["peak_bytes"] / measured["peak_memory"], 4)
    return row


def fits(modeled_peak, card_gb, ratio):
    """Whether a modeled peak fits a card, with the model's worst calibration ratio (it under-counts) and the
    CUDA context on top."""
    return modeled_peak / ratio / GIB + CONTEXT_GIB <= card_gb


# The step's memory flags recommended with and without gradient checkpointing (same losses and gradients; each
# costs some speed, not yet measured on a GPU): where the peak is in each case, see docs/performance.md.
MEMORY_FLAGS = {False: {"step_order": "discriminator_first", "generator_chunks": 2},
                True: {"generator_chunks": 4, "discriminator_chunks": 2}}
# The card table's configurations, all with gradient checkpointing: (name, teacher-latent cache, flags)
CARD_CONFIGS = (("defaults, teacher on the card", False, {}),
                ("memory flags, teacher on the card", False, MEMORY_FLAGS[True]),
                ("memory flags, teacher-latent cache", True, MEMORY_FLAGS[True]))
CARD_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # the micro-batches that divide the released global batch of 256


def flag_text(flags):
    return " ".join(f"--{k} {v}" for k, v in flags.items() if k not in NOT_FLAGS)


def card_rows(rows, ratio, global_batch=256):
    """For each card and configuration: the largest modeled micro-batch that fits, and the accumulation that
    reaches the released global batch (256) on one GPU."""
    out = []
    for card in CARDS_GB:
        for name, cache, flags in CARD_CONFIGS:
            # micro-batches that divide the global batch, so that accumulation reaches it exactly
            candidates = [r for r in rows if r["teacher_latent_cache"] == cache and r["gradient_checkpointing"]
                          and r["flags"] == flag_text(flags) and global_batch % r["batch_size"] == 0
                          and fits(r["modeled_peak_bytes"], card, ratio)]
            best = max(candidates, key=lambda r: r["batch_size"], default=None)
            out.append({"card_gb": card, "configuration": name, "teacher_latent_cache": cache,
                        "gradient_checkpointing": True, "flags": flag_text(flags),
                        "micro_batch": best["batch_size"] if best else 0,
                        "modeled_peak_bytes": best["modeled_peak_bytes"] if best else None,
                        "gradient_accumulation_steps": global_batch // best["batch_size"] if best else None})
    return out


def card_table(report):
    """The users' table (README and docs/performance.md print it verbatim; a test checks they match the JSON)."""
    cards = {}
    for c in report["cards"]:
        cards.setdefault(c["card_gb"], {})[c["configuration"]] = c

    def cell(c):
        if not c["micro_batch"]:
            return "does not fit"
        return (f"{c['micro_batch']} x {c['gradient_accumulation_steps']} "
                f"({c['modeled_peak_bytes'] / GIB:.1f} GiB)")

    names = [name for name, _, _ in CARD_CONFIGS]
    lines = ["| GPU memory | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {gb} GB | " + " | ".join(cell(d[n]) for n in names) + " |" for gb, d in sorted(cards.items())]
    return "\n".join(lines)


def markdown(report):
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = ["# Memory model of the training step (sd15, 512 px, fp16, LoRA 64, EMA)", "",
             f"Made by `{report['command']}` (`benchmarks/memory_model.py`, {report['seconds']:.0f} s on the CPU); "
             "GiB = 2^30 bytes. Measured = `torch.cuda.max_memory_allocated` on the H200 "
             "(`benchmarks/results/2026-11-30-h200/bench_sd15_h200.json`).", "",
             "## Calibration", "", "| row | modeled peak | measured peak | modeled / measured | modeled resident | measured resident |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "measured_peak_bytes" in r:
            lines.append(f"| {r['name']} | {g(r['modeled_peak_bytes'])} | {g(r['measured_peak_bytes'])} | "
                         f"{r['modeled_over_measured']:.3f} | {g(r['modeled_resident_bytes'])} | {g(r['measured_resident_bytes'])} |")
    lines += ["", "## Where the peak comes from (batch 16)", ""]
    for r in report["rows"]:
        if r["batch_size"] == 16 and "measured_peak_bytes" in r:
            lines.append(f"* **{r['name']}**: phase peaks " + ", ".join(
                f"{k} {g(v)}" for k, v in r["modeled_phase_peak_bytes"].items()) + "; live at the peak: " + ", ".join(
                f"{k} {g(v)}" for k, v in list(r["modeled_at_peak_bytes"].items())[:6]))
    lines += ["", "## Other rows", "", "| row | batch | checkpointing | cache | flags | modeled peak |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "measured_peak_bytes" not in r:
            lines.append(f"| {r['name']} | {r['batch_size']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{'on' if r['teacher_latent_cache'] else 'off'} | {r['flags'] or '-'} | {g(r['modeled_peak_bytes'])} |")
    if report.get("cards"):
        lines += ["", f"## Cards (modeled; fits = modeled peak / {report['fit_ratio']:.3f} + {CONTEXT_GIB} GiB "
                  "context <= the card; micro-batch x accumulation to 256)", "",
                  "Memory flags: `" + flag_text(MEMORY_FLAGS[True]) + "`.", "", card_table(report)]
    return "\n".join(lines) + "\n"


def parse_flags(text):
    """``"step_order=discriminator_first discriminator_chunks=2"`` -> settings overrides."""
    flags = {}
    for item in (text or "").split():
        key, _, value = item.partition("=")
        flags[key.lstrip("-")] = int(value) if value.isdigit() else value
    return flags


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="sd15", help="a config of benchmarks/configs (default sd15)")
    p.add_argument("--batch_size", type=int, nargs="+", default=[16])
    p.add_argument("--gradient_checkpointing", choices=["off", "on"], nargs="+", default=["on"])
    p.add_argument("--cache", choices=["off", "on"], nargs="+", default=["off"],
                   help="teacher-latent cache (on: no teacher on the GPU)")
    p.add_argument("--flags", default="", help='settings overrides, e.g. "step_order=discriminator_first discriminator_chunks=2"')
    p.add_argument("--calibrate", action="store_true",
                   help="model the H200 rows, the recommended rows and the card table; write --output (.json and .md)")
    p.add_argument("--card_batches", type=int, nargs="+", default=list(CARD_BATCHES))
    p.add_argument("--cards_only", action="store_true",
                   help="recompute the card table of an existing --output (or the default results) from its rows")
    p.add_argument("--output", default=None, help=f"JSON path (.md beside it); default with --calibrate: {RESULTS}.json")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = []
    if args.cards_only:
        output = Path(args.output or f"{RESULTS}.json")
        report = json.loads(output.read_text())
        report["cards"] = card_rows([r for r in report["rows"] if r["name"].startswith("card-")], report["fit_ratio"])
        args.calibrate, start = False, start - report.get("seconds", 0)
    elif args.calibrate:
        measured = json.loads(H200_JSON.read_text())["results"]
        for m in measured:
            # the code measured on 2026-11-30: one backward through F, D and G together
            r = model_step("sd15", m["batch_size"], m["gradient_checkpointing"], m["cache"], staged_backward=False,
                           share_autocast_casts=False)
            print(describe(r, m["peak_memory"]), flush=True)
            rows.append(row_of(r, m["name"], m))
        ratio = min(r["modeled_over_measured"] for r in rows)
        for gc in (False, True):  # the goal rows: today's defaults, the other order, the recommended memory flags
            for cache in (False, True):
                for suffix, flags in (("", {}), ("-discriminator_first", {"step_order": "discriminator_first"}),
                                      ("-memory_flags", MEMORY_FLAGS[gc])):
                    r = model_step("sd15", 16, gc, cache, **flags)
                    print(describe(r), flush=True)
                    rows.append(row_of(r, f"goal-bs16-gc_{'on' if gc else 'off'}-cache_{'on' if cache else 'off'}{suffix}"))
        for name, cache, flags in CARD_CONFIGS:
            for bs in args.card_batches:
                r = model_step("sd15", bs, True, cache, **flags)
                print(describe(r), flush=True)
                rows.append(row_of(r, f"card-bs{bs}-gc_on-cache_{'on' if cache else 'off'}"
                                      + ("-memory_flags" if flags else "")))
        report = {"model": "benchmarks/memory_model.py", "command": "python benchmarks/memory_model.py --calibrate",
                  "torch": torch.__version__, "fit_ratio": ratio, "rows": rows}
        report["cards"] = card_rows([r for r in rows if r["name"].startswith("card-")], ratio)
        output = Path(args.output or f"{RESULTS}.json")
    if not (args.calibrate or args.cards_only):
        for bs in args.batch_size:
            for gc in args.gradient_checkpointing:
                for cache in args.cache:
                    r = model_step(args.config, bs, gc == "on", cache == "on", **parse_flags(args.flags))
                    print(describe(r), flush=True)
                    rows.append(row_of(r, f"bs{bs}-gc_{gc}-cache_{cache}"))
        report = {"model": "benchmarks/memory_model.py", "command": "python benchmarks/memory_model.py " + " ".join(argv or sys.argv[1:]),
                  "torch": torch.__version__, "rows": rows}
        output = Path(args.output) if args.output else None
    report["seconds"] = round(time.perf_counter() - start, 1)
    if output:
        from yoso.utils.atomic import atomic_path

        with atomic_path(output) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
        with atomic_path(output.with_suffix(".md")) as tmp:
            Path(tmp).write_text(markdown(report))
        print(f"wrote {output} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
