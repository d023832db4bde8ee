#!/usr/bin/env python
"""Benchmark of the YOSO training step: seconds per optimizer step, peak memory (overall and per phase), UNet
passes, phase times, FLOPs and MFU.

Runs the project's own step (``yoso.method.step.YOSOTrainingStep.step``, the code ``train_yoso_lora.py`` calls)
on models built from the JSON configs in ``benchmarks/configs`` with random weights (no download):

    tiny   the test models (CI smoke check)
    mid    SD1.5's / SD-Turbo's block layouts with narrow channels (a few minutes on 2 CPU cores)
    sd15   full SD1.5 base + SD-Turbo (SD2.1 UNet, OpenCLIP ViT-H text) teacher shapes, for a GPU

Each option below that takes several values runs every combination, building the models once:

    python benchmarks/bench_train_step.py --config mid --cache off on --output benchmarks/results/mid_cpu.json
    python benchmarks/bench_train_step.py --recipe --gradient_checkpointing off on \
        --step_order generator_first discriminator_first --discriminator_chunks 1 2 --output bench_sd15.json

``--memory_flags`` adds, for each checkpointing setting, the configuration the memory model recommends
(``benchmarks/memory_model.py``'s ``MEMORY_FLAGS``), so a GPU run measures what the README's card table models.

``--recipe`` is the published per-GPU setting (sd15, fp16, batch 16, gradient checkpointing, EMA, LoRA rank 64,
512 px); ``--torch_compile``, ``--channels_last`` and ``--adam_fused`` are the training script's flags (one value
per process: they change how the models are built).

One measured step is what one optimizer step of ``train_yoso_lora.py`` runs (gradient accumulation 1):
fetching the batch (tokenizing; with the cache, reading the latents by index) and ``trainer.step``.
"cache on" trains from a teacher-latent cache written by the same code as ``precompute_teacher_latents.py``
(built once, before the cache-on configurations, then the teacher is freed), so it shows both the time
saved per step and the memory freed. Phases are timed with a device synchronize at each boundary.
Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the process RSS (sampled every 10 ms) on CPU,
over the measured steps and inside each phase (the peak counter is reset at every phase boundary). FLOPs come
from ``torch.utils.flop_counter.FlopCounterMode`` around one extra step (forward, backward and optimizer;
recomputation under gradient checkpointing included), and again with checkpointing off for the model's FLOPs:
MFU = model FLOPs per second / the card's dense 16-bit peak. With ``--torch_compile`` the warm-up steps' extra
time is reported as compile time. On CUDA one more step runs with ``torch.cuda.set_sync_debug_mode("warn")``
and counts the host synchronisations by source line.

The run is built by the training script's own builder (``yoso.training.builder.build_run``) from config-built parts
in place of loaded ones; ``tests/test_benchmark.py`` checks that both give the same modules, dtypes and
trainable set.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from yoso.utils.atomic import atomic_path  # noqa: E402
from yoso.utils.precision import weight_dtype_for  # noqa: E402

PHASES = ("data", "teacher", "generator", "discriminator", "feature_net", "adversarial", "backward", "optimizer", "ema")

# The published recipe's per-process settings (SPEC section 4), for --recipe; fp16, EMA and the teacher as released.
RECIPE = {"config": "sd15", "mixed_precision": "fp16", "batch_size": [16], "gradient_checkpointing": ["on"],
          "lora_rank": 64, "resolution": 512}
DEFAULTS = {"config": "tiny", "mixed_precision": "no", "gradient_checkpointing": ["off"]}

# Dense FP16/BF16 tensor-core peaks from the vendors' datasheets (TFLOP/s), matched against the device name
# in this order. Override with --peak_tflops.
PEAK_TFLOPS_16BIT = (
    ("H100 NVL", None),  # not matched to a number here: give --peak_tflops
    ("H100 PCIe", 756.0),
    ("H100", 989.4),   # SXM (the "80GB HBM3" part)
    ("H200", 989.4),
    ("A100", 312.0),
)


def load_config(name_or_path):
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        sys.exit(f"bench_train_step.py: error: --config {name_or_path}: no such config (see {CONFIG_DIR})")
    return json.loads(path.read_text()), path


# ---- models ------------------------------------------------------------------------------------------

def build_pipeline_parts(spec, device):
    """Tokenizer, text encoder, VAE, UNet of one model spec, random weights, created directly on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from yoso.testing import make_clip_tokenizer

    tokenizer = make_clip_tokenizer(pad_token=spec.get("tokenizer_pad_token", "<|endoftext|>"))
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).eval()
        vae = AutoencoderKL.from_config(spec["vae"]).eval()
        unet = UNet2DConditionModel.from_config(spec["unet"]).eval()
    return tokenizer, text_encoder, vae, unet


def build_teacher_pipeline(spec, device, weight_dtype):
    """An SD-Turbo-shaped pipeline from ``spec``, placed as ``yoso.data.teacher.load_teacher`` places a loaded one."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from yoso.testing import TURBO_SCHEDULER_CONFIG

    tokenizer, text_encoder, vae, unet = build_pipeline_parts(spec, device)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=EulerDiscreteScheduler.from_config(TURBO_SCHEDULER_CONFIG),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.to(device, weight_dtype)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipeline


def build_parts(config, device, weight_dtype, with_teacher=True):
    """``yoso.training.models.ModelParts`` of a config: the base model's pieces and the teacher, random weights."""
    from diffusers import DDPMScheduler

    from yoso.training.models import ModelParts
    from yoso.testing import SD15_SCHEDULER_CONFIG

    tokenizer, text_encoder, vae, unet = build_pipeline_parts(config["base"], device)
    teacher = build_teacher_pipeline(config["teacher"], device, weight_dtype) if with_teacher else None
    return ModelParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG), teacher_pipeline=teacher)


def run_settings(config, resolution, lora_rank, teacher_num_inference_steps=1, **overrides):
    """The training script's settings for a benchmark run. Gradient checkpointing is always *enabled*
    before D copies the encoder (so D's blocks can checkpoint); ``set_gradient_checkpointing`` flips it."""
    from yoso.training.builder import RunSettings

    return RunSettings(pretrained_model_name_or_path=f"bench:{config['name']}", resolution=resolution,
                       lora_rank=lora_rank, gradient_checkpointing=True,
                       teacher_num_inference_steps=teacher_num_inference_steps, **overrides)


def set_gradient_checkpointing(modules, enabled):
    for module in modules:
        for m in module.modules():
            if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func"):
                m.gradient_checkpointing = enabled


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ---- measuring ---------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """``timer(phase)`` for ``YOSOTrainingStep``: accumulates wall time per phase, synchronizing the device, and,
    with a ``memory`` probe, the peak memory inside each phase (the stretches between phases count as "other")."""

    def __init__(self, device, memory=None):
        self.device = device
        self.memory = memory
        self.totals = {}
        self.peaks = {}

    def reset(self):
        self.totals = {}

    def _fold(self, phase):
        if self.memory is not None:
            self.peaks[phase] = max(self.peaks.get(phase, 0), self.memory.window_peak())
            self.memory.new_window()

    @contextmanager
    def __call__(self, phase):
        synchronize(self.device)
        self._fold("other")
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start
            self._fold(phase)


class CudaPeakMemory:
    """Peak ``torch.cuda.max_memory_allocated`` over a window (reset per phase) and over all windows."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def new_window(self):
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def window_peak(self):
        return torch.cuda.max_memory_allocated(self.device)

    def __enter__(self):
        torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = 0
        return self

    def __exit__(self, *exc):
        self.new_window()
        return False


class PeakRSS:
    """Peak resident set size of this process while running (a polling thread), overall and per window."""

    def __init__(self, interval=0.01):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.window = 0
        self._stop = threading.Event()
        self._thread = None

    def current(self):
        return self.process.memory_info().rss

    def _sample(self):
        rss = self.current()
        self.peak = max(self.peak, rss)
        return rss

    def new_window(self):
        self.window = self._sample()

    def window_peak(self):
        self.window = max(self.window, self._sample())
        return self.window

    def __enter__(self):
        self.peak = self.window = self.current()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.window = max(self.window, self._sample())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
        return False


class PassCounter:
    """Counts forward calls (and samples) of the teacher UNet, G, F and D with forward hooks."""

    def __init__(self, modules):
        self.calls = {name: 0 for name in modules}
        self.samples = {name: 0 for name in modules}
        self.active = False
        self.handles = [m.register_forward_hook(self._hook(name), with_kwargs=True) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            if not self.active:
                return
            sample = args[0] if args else kwargs.get("sample", next(iter(kwargs.values()), None))
            self.calls[name] += 1
            self.samples[name] += int(sample.shape[0]) if torch.is_tensor(sample) else 0
        return hook

    def reset(self):
        for name in self.calls:
            self.calls[name] = self.samples[name] = 0

    def remove(self):
        for handle in self.handles:
            handle.remove()


def peak_tflops_for(device_name, mixed_precision, override=None):
    if override:
        return override
    if mixed_precision not in ("fp16", "bf16"):
        return None
    for key, value in PEAK_TFLOPS_16BIT:
        if key in device_name:
            return value
    return None


def count_host_syncs(run_step, device):
    """Run ``run_step()`` once with CUDA's sync debug mode on: each operation that makes the host wait for the
    device warns. Returns (count, {"file:line": count}) or None off CUDA."""
    import warnings

    if device.type != "cuda":
        return None
    sites = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            site = f"{Path(w.filename).name}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return sum(sites.values()), dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def return_freed_memory_at_once(threshold=64 << 10):
    """CPU: make glibc serve every allocation of ``threshold`` bytes or more with its own mmap and unmap it when
    freed (``mallopt(M_MMAP_THRESHOLD)``, the same as the environment variable ``MALLOC_MMAP_THRESHOLD_``), so
    that the process RSS follows the live tensors and a phase's RSS peak is that phase's own. By default glibc
    keeps freed memory, and RSS only ever shows the high-water mark. Costs page faults: time figures of such a
    run are slower than usual. Returns whether it took effect."""
    try:
        import ctypes

        m_mmap_threshold = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


def release_memory(cuda):
    """Collect garbage and hand freed memory back (CUDA cache; glibc heap on CPU, so RSS reflects live memory)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_grad_scaler(accelerator):
    """After a step that failed half-way (OOM), forget fp16 loss-scaler state of the unfinished step."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and hasattr(scaler, "_per_optimizer_states"):
        from collections import defaultdict

        from torch.amp.grad_scaler import _refresh_per_optimizer_state

        scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)


def is_oom(error):
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "out of memory" in str(error).lower()


# ---- the run -----------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, config):
        from accelerate import Accelerator

        self.args = args
        self.config = config
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
        self.device = self.accelerator.device
        self.weight_dtype = weight_dtype_for(self.accelerator)
        self.resolution = args.resolution or config["resolution"]
        self.lora_rank = args.lora_rank or config.get("lora_rank", 64)
        self.cuda = self.device.type == "cuda"
        self.report = {"benchmark": "bench_train_step", "version": 1}
        self.cache_dir = None
        self.reader = None

    # -- setup
    def build(self):
        from yoso.method.lora import lora_named_parameters
        from yoso.training.builder import build_run

        args = self.args
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        # The teacher is always built: cache-off configurations run it, and it writes the cache for cache-on ones.
        parts = build_parts(self.config, self.device, self.weight_dtype)
        settings = run_settings(self.config, self.resolution, self.lora_rank, args.teacher_num_inference_steps,
                                use_ema=True, learning_rate=1e-5, use_8bit_adam=args.use_8bit_adam, seed=args.seed,
                                adam_fused=args.adam_fused, torch_compile=args.torch_compile,
                                torch_compile_backend=args.torch_compile_backend, channels_last=args.channels_last)
        self.run = build_run(settings, self.accelerator, num_training_steps=args.warmup_steps + args.steps + 1,
                             parts=parts)
        self.models = m = self.run.models
        self.unet, self.discriminator = self.run.unet, self.run.discriminator
        self.unet_module, self.discriminator_module = self.run.unet_module, self.run.discriminator_module
        synchronize(self.device)
        self.build_seconds = time.perf_counter() - start
        counted = {"generator": self.unet_module, "feature_net": m.feature_net.encoder,
                   "discriminator": self.discriminator_module}
        if m.latent_source is not None:
            counted = {"teacher": m.latent_source.pipeline.unet, **counted}
        self.passes = PassCounter(counted)
        teacher = m.latent_source.pipeline if m.latent_source is not None else None
        self.report["models"] = {
            "base_unet_parameters": count_parameters(m.unet) - sum(p.numel() for _, p in lora_named_parameters(m.unet)),
            "lora_parameters": sum(p.numel() for _, p in lora_named_parameters(m.unet)),
            "discriminator_parameters": count_parameters(m.discriminator),
            "base_text_encoder_parameters": count_parameters(m.text_encoder),
            "base_vae_parameters": count_parameters(m.vae),
            "teacher_unet_parameters": count_parameters(teacher.unet) if teacher else None,
            "teacher_text_encoder_parameters": count_parameters(teacher.text_encoder) if teacher else None,
            "build_seconds": round(self.build_seconds, 2),
        }

    def prompts(self, count):
        subjects = ["a red fox in the snow", "an old lighthouse at dusk", "a bowl of ramen", "a tiny robot",
                    "a field of sunflowers", "a portrait of a knight, oil painting", "a koi pond, watercolor"]
        return [f"{subjects[i % len(subjects)]}, variation {i}" for i in range(count)]

    def num_prompts(self):
        # Warm-up, measured, then up to three single steps (host syncs, FLOPs, FLOPs without checkpointing).
        return max(self.args.batch_size) * (self.args.warmup_steps + self.args.steps + 3)

    def build_cache(self):
        """Write a teacher-latent cache with the project's precompute code, then free the teacher."""
        from yoso.data.latent_cache import LatentCacheReader, make_cache_settings, precompute_latents, text_dtype, write_cache_info

        m = self.models
        prompts = self.prompts(self.num_prompts())
        settings = make_cache_settings(f"bench:{self.config['name']}", self.resolution, m.latent_shape,
                                       self.args.teacher_num_inference_steps, 0.0, self.args.seed, prompts)
        noise_dtype = text_dtype(self.accelerator.autocast, self.device, self.weight_dtype)
        self.cache_tmp = tempfile.TemporaryDirectory(prefix="yoso-bench-cache-")
        self.cache_dir = Path(self.cache_tmp.name)
        synchronize(self.device)
        start = time.perf_counter()
        batch_size = max(self.args.batch_size)
        shard_size = max(self.args.cache_shard_size // batch_size, 1) * batch_size
        precompute_latents(self.cache_dir, m.latent_source, prompts, settings, num_epochs=1,
                           shard_size=shard_size, batch_size=batch_size,
                           device=self.device, noise_dtype=noise_dtype, autocast=self.accelerator.autocast)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        first = next(self.cache_dir.glob("latents-*.safetensors"))
        from safetensors import safe_open

        with safe_open(str(first), framework="pt") as f:
            latent_dtype = f.get_slice("latents")[0:1].dtype
        write_cache_info(self.cache_dir, settings, 1, shard_size, batch_size, latent_dtype, noise_dtype,
                         self.accelerator.mixed_precision)
        self.reader = LatentCacheReader(self.cache_dir)
        teacher = m.latent_source.pipeline
        teacher_bytes = sum(p.numel() * p.element_size() for component in teacher.components.values()
                            if isinstance(component, torch.nn.Module) for p in component.parameters())
        del teacher
        before = self.memory_now()
        self.passes.remove()
        m.latent_source = self.run.trainer.latent_source = None
        self.passes = PassCounter({"generator": self.unet_module, "feature_net": m.feature_net.encoder,
                                   "discriminator": self.discriminator_module})
        release_memory(self.cuda)
        after = self.memory_now()
        size = sum(p.stat().st_size for p in self.cache_dir.iterdir())
        self.report["cache"] = {
            "prompts": len(prompts), "build_seconds": round(seconds, 3),
            "seconds_per_prompt": seconds / len(prompts), "bytes_on_disk": size, "latent_dtype": str(latent_dtype),
            "memory_kind": self.memory_kind(),
            "memory_before_freeing_teacher": before, "memory_after_freeing_teacher": after,
            "teacher_memory_freed": before - after, "teacher_weight_bytes": teacher_bytes,
        }

    def memory_kind(self):
        return "cuda_memory_allocated" if self.cuda else "process_rss"

    def memory_now(self):
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        import psutil

        return psutil.Process().memory_info().rss

    # -- one configuration
    def run_config(self, batch_size, gradient_checkpointing, cache, step_order="generator_first", discriminator_chunks=1,
                   generator_chunks=1):
        from yoso.data.prompts import ShardedPromptSampler, tokenize_prompts
        from yoso.method.step import NonFiniteLossError, no_timer, step_generator

        args, m, accelerator = self.args, self.models, self.accelerator
        name = config_name(batch_size, gradient_checkpointing, cache, step_order, discriminator_chunks, generator_chunks)
        result = {"name": name, "batch_size": batch_size, "resolution": self.resolution,
                  "gradient_checkpointing": gradient_checkpointing, "cache": cache == "on",
                  "step_order": step_order, "discriminator_chunks": discriminator_chunks,
                  "generator_chunks": generator_chunks,
                  "mixed_precision": accelerator.mixed_precision, "use_8bit_adam": args.use_8bit_adam}
        set_gradient_checkpointing([self.unet_module, self.discriminator_module], gradient_checkpointing)
        timer = PhaseTimer(self.device)
        trainer = self.run.trainer
        trainer.timer = timer
        trainer.step_order, trainer.discriminator_chunks = step_order, discriminator_chunks
        trainer.generator_chunks = generator_chunks
        trainer.latent_source = m.latent_source if cache == "off" else None
        prompts = self.prompts(self.num_prompts())
        sampler = ShardedPromptSampler(len(prompts), batch_size, 1, 0, args.seed)
        batches = sampler.batches()
        self.unet.train()
        self.discriminator.train()

        def one_step(i):
            with timer("data"):
                epoch, _, indices = next(batches)
                batch_prompts = [prompts[j] for j in indices]
                batch = {"prompts": batch_prompts, "input_ids": tokenize_prompts(m.tokenizer, batch_prompts),
                         "indices": indices, "epoch": epoch}
                if cache == "on":
                    batch["latents"] = self.reader.latents(epoch, indices)
            with accelerator.accumulate(self.unet, self.discriminator):
                return trainer.step(batch, step_generator(args.seed, i, 0))

        def timed_step(i):
            synchronize(self.device)
            start = time.perf_counter()
            logs = one_step(i)
            synchronize(self.device)
            seconds = time.perf_counter() - start
            if i == args.warmup_steps:  # the first measured step's losses (same seeds and data in every run)
                result["first_measured_losses"] = {k: logs[k].item() for k in ("loss_con", "loss_kl", "loss_adv", "loss_d")}
            return seconds

        seconds, phases = [], []
        status = "ok"
        extra = args.warmup_steps + args.steps  # index of the next step after the measured ones
        try:
            result["status"], result["warmup_seconds"] = "running", []
            self.write(running=result)
            for i in range(args.warmup_steps):
                result["warmup_seconds"].append(round(timed_step(i), 4))
                self.write(running=result)
            if args.torch_compile:
                import torch._dynamo.utils

                result["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            result["resident_memory"] = self.memory_now()
            memory = CudaPeakMemory(self.device) if self.cuda else PeakRSS()
            timer.memory = memory
            self.passes.reset()
            self.passes.active = True
            try:
                with memory:
                    for i in range(args.warmup_steps, args.warmup_steps + args.steps):
                        timer.reset()
                        seconds.append(timed_step(i))
                        phases.append(dict(timer.totals))
            finally:
                self.passes.active = False
                timer.memory = None
            result["peak_memory"] = memory.peak
            result["phase_peak_memory"] = dict(timer.peaks)
            result["memory_kind"] = self.memory_kind()
            trainer.timer = no_timer  # no benchmark synchronisation in the steps below
            syncs = count_host_syncs(lambda: one_step(extra), self.device)
            extra += 1
            if syncs is not None:
                result["host_syncs_per_step"], result["host_sync_sites"] = syncs
            if args.flops:
                result["flops_per_step"] = self.count_flops(lambda: one_step(extra))
                extra += 1
                if gradient_checkpointing:  # the model's FLOPs, without the recomputation (for MFU)
                    set_gradient_checkpointing([self.unet_module, self.discriminator_module], False)
                    try:
                        result["model_flops_per_step"] = self.count_flops(lambda: one_step(extra))
                        extra += 1
                    except Exception as error:
                        result["model_flops_error"] = f"{type(error).__name__}: {str(error)[:200]}"
                        release_memory(self.cuda)
                    finally:
                        set_gradient_checkpointing([self.unet_module, self.discriminator_module], True)
                else:
                    result["model_flops_per_step"] = result["flops_per_step"]
        except NonFiniteLossError as error:
            status, result["error"] = "nonfinite", str(error)
        except Exception as error:  # one failed configuration must not lose the others
            status = "oom" if is_oom(error) else "error"
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
            if status == "error":
                traceback.print_exc()
        result["status"] = status
        trainer.timer = no_timer
        self.run.optimizer_g.zero_grad(set_to_none=True)
        self.run.optimizer_d.zero_grad(set_to_none=True)
        if status != "ok":
            try:
                reset_grad_scaler(self.accelerator)
            except Exception as error:  # private torch API: never let it end the run
                print(f"[bench] could not reset the loss scaler: {error}", flush=True)
        release_memory(self.cuda)
        if seconds:
            median = statistics.median(seconds)
            result["seconds_per_step"] = [round(s, 4) for s in seconds]
            result["median_seconds_per_step"] = median
            result["images_per_second"] = batch_size / median
            if args.torch_compile and result["warmup_seconds"]:
                # The warm-up steps' time beyond that of as many measured steps: compilation (and autotuning).
                result["compile_seconds"] = max(sum(result["warmup_seconds"]) - len(result["warmup_seconds"]) * median, 0.0)
            split = {p: statistics.median([ph.get(p, 0.0) for ph in phases]) for p in PHASES}
            split["other"] = max(median - sum(split.values()), 0.0)
            result["phases_median_seconds"] = split
            steps = len(seconds)
            result["unet_passes_per_step"] = {k: v / steps for k, v in self.passes.calls.items()}
            result["unet_passes_per_step"]["total"] = sum(result["unet_passes_per_step"].values())
            result["unet_samples_per_prompt"] = {k: v / steps / batch_size for k, v in self.passes.samples.items()}
            if "flops_per_step" in result:
                result["achieved_tflops"] = result["flops_per_step"] / median / 1e12
                peak = peak_tflops_for(self.report["device"]["name"], accelerator.mixed_precision, args.peak_tflops)
                if peak:
                    result["peak_tflops"] = peak
                if "model_flops_per_step" in result:
                    result["model_tflops"] = result["model_flops_per_step"] / median / 1e12
                    if peak:
                        result["mfu"] = result["model_tflops"] / peak
        return result

    def count_flops(self, run_step):
        """FLOPs of one step (forward, backward, optimizer; a checkpointed block's recomputation included)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            run_step()
        return int(counter.get_total_flops())

    # -- everything
    def environment(self):
        import accelerate
        import diffusers
        import transformers

        device = {"type": self.device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                  "python": platform.python_version()}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            device.update(name=torch.cuda.get_device_name(self.device), memory_bytes=props.total_memory,
                          cuda=torch.version.cuda)
        else:
            device.update(name=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                          torch_threads=torch.get_num_threads())
        return device

    def write(self, running=None):
        """The report so far; ``running``: a configuration still being measured, recorded as it stands (so a
        run killed by a time limit during a long warm-up, e.g. compiling, still says how far it got)."""
        if not self.args.output:
            return
        report = self.report if running is None else {**self.report, "results": self.report["results"] + [running]}
        with atomic_path(self.args.output) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")

    def run(self):
        args = self.args
        self.report["device"] = self.environment()
        self.report["config"] = self.config["name"]
        self.report["settings"] = {
            "resolution": self.resolution, "lora_rank": self.lora_rank, "mixed_precision": self.accelerator.mixed_precision,
            "weight_dtype": str(self.weight_dtype), "warmup_steps": args.warmup_steps, "measured_steps": args.steps,
            "teacher_num_inference_steps": args.teacher_num_inference_steps, "use_8bit_adam": args.use_8bit_adam,
            "use_ema": True, "seed": args.seed, "recipe": args.recipe, "adam_fused": args.adam_fused,
            "torch_compile": args.torch_compile, "torch_compile_backend": args.torch_compile_backend,
            "channels_last": args.channels_last, "exact_cpu_memory": args.exact_cpu_memory,
            "malloc_mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "command": " ".join(sys.argv),
        }
        self.report["results"] = []
        self.write()
        self.build()
        from yoso.method.step import uses_fused_step

        self.report["settings"]["fused_adamw"] = uses_fused_step(self.run.optimizer_g)
        self.report["settings"]["compiled_blocks"] = sum(
            getattr(m, "_compiled_call_impl", None) is not None
            for model in (self.unet_module, self.discriminator_module) for m in model.modules())
        self.write()
        print(f"[bench] {self.config['name']} on {self.report['device']['name']} ({self.device.type}), "
              f"built in {self.build_seconds:.1f}s", flush=True)
        for batch_size, gradient_checkpointing, cache, step_order, d_chunks, g_chunks in configurations(args):
            if cache == "on" and self.reader is None:
                self.build_cache()
                self.write()
                c = self.report["cache"]
                print(f"[bench] cache: {c['prompts']} prompts in {c['build_seconds']:.1f}s; freeing the teacher freed "
                      f"{c['teacher_memory_freed'] / 2**20:.0f} MiB ({c['memory_kind']})", flush=True)
            result = self.run_config(batch_size, gradient_checkpointing, cache, step_order, d_chunks, g_chunks)
            self.report["results"].append(result)
            self.write()
            print(f"[bench] {format_result(result)}", flush=True)
        table = format_table(self.report)
        print(table, flush=True)
        if self.args.output:  # the tables beside the JSON (gpu_run.sh commits both)
            with atomic_path(Path(self.args.output).with_suffix(".md")) as tmp:
                tmp.write_text(table + "\n")
        return self.report


def size(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def configurations(args):
    """(batch, checkpointing, cache, order, D chunks, G chunks) for every run: each combination of the options'
    values, cache off first (the teacher is freed for the cache), then with ``--memory_flags`` the memory
    model's recommended configuration for each checkpointing setting (once, if not already among them)."""
    result = []
    for cache in args.cache:
        for batch_size in args.batch_size:
            for gc_mode in args.gradient_checkpointing:
                combos = [(o, d, g) for o in args.step_order for d in args.discriminator_chunks for g in args.generator_chunks]
                if args.memory_flags:
                    sys.path.insert(0, str(Path(__file__).resolve().parent))
                    from memory_model import MEMORY_FLAGS

                    flags = MEMORY_FLAGS[gc_mode == "on"]
                    recommended = (flags.get("step_order", "generator_first"), flags.get("discriminator_chunks", 1),
                                   flags.get("generator_chunks", 1))
                    combos += [recommended] if recommended not in combos else []
                result += [(batch_size, gc_mode == "on", cache, *combo) for combo in combos]
    return result


def config_name(batch_size, gradient_checkpointing, cache, step_order="generator_first", discriminator_chunks=1,
                generator_chunks=1):
    name = f"bs{batch_size}-gc_{'on' if gradient_checkpointing else 'off'}-cache_{cache}"
    if step_order != "generator_first":
        name += f"-{step_order}"
    if discriminator_chunks != 1:
        name += f"-dchunks{discriminator_chunks}"
    if generator_chunks != 1:
        name += f"-gchunks{generator_chunks}"
    return name


def format_result(r):
    if r["status"] != "ok":
        return f"{r['name']}: {r['status']} ({r.get('error', '')})"
    if "median_seconds_per_step" not in r:
        return f"{r['name']}: built, no step measured"
    mib = r["peak_memory"] / 2**20
    flops = f", {r['achieved_tflops']:.2f} TFLOP/s" if "achieved_tflops" in r else ""
    mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    compiled = f", compile {r['compile_seconds']:.1f}s" if "compile_seconds" in r else ""
    syncs = f", {r['host_syncs_per_step']} host syncs" if "host_syncs_per_step" in r else ""
    return f"{r['name']}: {r['median_seconds_per_step']:.3f} s/step, peak {mib:.0f} MiB{flops}{mfu}{compiled}{syncs}"


def model_flops(report, r):
    """FLOPs of the step without checkpointing's recomputation: counted (newer reports), or else those of the
    same configuration without checkpointing in the same report (earlier ones), or None."""
    if r.get("model_flops_per_step"):
        return r["model_flops_per_step"]
    if not r["gradient_checkpointing"]:
        return r.get("flops_per_step")
    key = lambda x: (x["batch_size"], x["cache"], x.get("step_order", "generator_first"), x.get("discriminator_chunks", 1),  # noqa: E731
                     x.get("generator_chunks", 1))
    same = [x for x in report["results"] if x["status"] == "ok" and not x["gradient_checkpointing"] and key(x) == key(r)]
    return same[0].get("flops_per_step") if same else None


def mfu_of(report, r):
    """Model FLOP utilization: model FLOPs per second over the card's dense 16-bit peak (None when unknown)."""
    flops, peak = model_flops(report, r), r.get("peak_tflops")
    if peak is None and report["device"]["type"] == "cuda":
        peak = peak_tflops_for(report["device"].get("name", ""), report["settings"]["mixed_precision"])
    return flops / r["median_seconds_per_step"] / 1e12 / peak if flops and peak else None


def format_table(report):
    """The results as Markdown tables: the step, its phases' times, their peak memory (the README uses them)."""
    device = report["device"]
    settings = report["settings"]
    where = f"{device['name']} ({device['type']}" + (f", {device.get('cpu_count')} cores" if device["type"] == "cpu" else "") + ")"
    speed = [name for name, on in (("torch.compile", settings.get("torch_compile")), ("channels-last", settings.get("channels_last")),
                                   ("fused AdamW", settings.get("fused_adamw"))) if on]
    lines = [f"{report['config']} on {where}, {settings['mixed_precision']} mixed precision, "
             f"{settings['resolution']} px, LoRA rank {settings['lora_rank']}" + (f", {', '.join(speed)}" if speed else ""),
             "",
             "| batch | grad. ckpt | cache | order | D chunks | G chunks | s/step | img/s | peak mem (GiB) | GFLOP/step (model / run) "
             "| model TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = []
    for r in report["results"]:
        head = (f"| {r['batch_size']} | {'on' if r['gradient_checkpointing'] else 'off'} | {'on' if r['cache'] else 'off'} "
                f"| {r.get('step_order', 'generator_first')} | {r.get('discriminator_chunks', 1)} "
                f"| {r.get('generator_chunks', 1)} ")
        if r["status"] != "ok":
            lines.append(head + f"| {r['status'].upper()} |" + " |" * 5)
            continue
        if "median_seconds_per_step" not in r:
            lines.append(head + "| no step measured |" + " |" * 5)
            continue
        ok.append((head, r))
        flops, model, mfu = r.get("flops_per_step"), model_flops(report, r), mfu_of(report, r)
        median = r["median_seconds_per_step"]
        giga = lambda x: f"{x / 1e9:.1f}" if x else "-"  # noqa: E731
        model_rate = f"{model / median / 1e12:.2f}" if model else "-"
        lines.append(
            head + f"| {median:.3f} | {r['images_per_second']:.2f} | {r['peak_memory'] / 2**30:.2f} "
            f"| {giga(model)} / {giga(flops)} | {model_rate} | {f'{mfu:.1%}' if mfu else '-'} |")
    if ok:
        lines += ["", "Median seconds per phase (device-synchronized):", "",
                  "| batch | grad. ckpt | cache | order | D chunks | G chunks | " + " | ".join(PHASES) + " | other |",
                  "|---|---|---|---|---|---|" + "---|" * (len(PHASES) + 1)]
        for head, r in ok:
            p = r["phases_median_seconds"]
            lines.append(head + "| " + " | ".join(f"{p[k]:.3f}" if k in p else "-" for k in (*PHASES, "other")) + " |")
    with_memory = [(head, r) for head, r in ok if r.get("phase_peak_memory")]
    if with_memory:
        kind = "torch.cuda.max_memory_allocated" if with_memory[0][1]["memory_kind"] != "process_rss" else "process RSS"
        lines += ["", f"Peak memory inside each phase, MiB ({kind}, reset at each phase boundary; 'other': between "
                      "phases; 'resident': before the measured steps):",
                  "", "| batch | grad. ckpt | cache | order | D chunks | G chunks | resident | " + " | ".join(PHASES)
                  + " | other |",
                  "|---|---|---|---|---|---|---|" + "---|" * (len(PHASES) + 1)]
        for head, r in with_memory:
            m = r["phase_peak_memory"]
            lines.append(head + f"| {r['resident_memory'] / 2**20:.0f} | "
                         + " | ".join(f"{m[k] / 2**20:.0f}" if k in m else "-" for k in (*PHASES, "other")) + " |")
    extras = [f"{r['name']}: {r['compile_seconds']:.1f} s compiling ({r.get('compiled_graphs', '?')} graphs)"
              for _, r in ok if "compile_seconds" in r]
    extras += [f"{r['name']}: {r['host_syncs_per_step']} host syncs per step "
               f"({', '.join(f'{k} x{v}' for k, v in list(r['host_sync_sites'].items())[:6])})"
               for _, r in ok if "host_syncs_per_step" in r]
    if extras:
        lines += [""] + [f"- {e}" for e in extras]
    if "cache" in report:
        c = report["cache"]
        lines += ["", f"Cache: built for {c['prompts']} prompts in {c['build_seconds']:.2f} s "
                      f"({c['seconds_per_prompt'] * 1e3:.1f} ms/prompt, {c['bytes_on_disk'] / c['prompts'] / 1024:.1f} KiB/prompt "
                      f"on disk); freeing the teacher ({size(c['teacher_weight_bytes'])} of weights) released "
                      f"{size(c['teacher_memory_freed'])} ({c['memory_kind']})."]
    if ok:
        r = ok[0][1]
        passes = ", ".join(f"{k} {v:g}" for k, v in r["unet_passes_per_step"].items())
        lines += [f"UNet passes per step ({r['name']}): {passes}."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the YOSO training step on config-built random-weight models.")
    p.add_argument("--recipe", action="store_true",
                   help="The published settings: --config sd15 --mixed_precision fp16 --batch_size 16 "
                        "--gradient_checkpointing on --lora_rank 64 --resolution 512 (EMA and the teacher always run); "
                        "options given with it take precedence.")
    p.add_argument("--config", default=None, help="tiny (default), mid, sd15, or a path to a JSON config.")
    p.add_argument("--batch_size", type=int, nargs="+", default=None, help="Prompts per step (default: the config's).")
    p.add_argument("--resolution", type=int, default=None, help="Default: the config's.")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Default: no.")
    p.add_argument("--gradient_checkpointing", nargs="+", default=None, choices=["off", "on"], help="Default: off.")
    p.add_argument("--cache", nargs="+", default=["off"], choices=["off", "on"],
                   help="off: the teacher runs every step; on: latents from a teacher-latent cache (teacher freed).")
    p.add_argument("--step_order", nargs="+", default=["generator_first"], choices=["generator_first", "discriminator_first"],
                   help="The training step's order (train_yoso_lora.py --step_order).")
    p.add_argument("--discriminator_chunks", type=int, nargs="+", default=[1],
                   help="Pieces of D's update (train_yoso_lora.py --discriminator_chunks): 1 or even.")
    p.add_argument("--generator_chunks", type=int, nargs="+", default=[1],
                   help="Pieces of F's and D's passes in G's update (train_yoso_lora.py --generator_chunks): >= 1.")
    p.add_argument("--memory_flags", action="store_true",
                   help="Also run the memory model's recommended flags for each --gradient_checkpointing value "
                        "(benchmarks/memory_model.py MEMORY_FLAGS; the README's card table).")
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit for the LoRA and D (CUDA).")
    p.add_argument("--adam_fused", default="auto", choices=["auto", "on", "off"], help="As train_yoso_lora.py (auto: on CUDA).")
    p.add_argument("--torch_compile", action="store_true", help="As train_yoso_lora.py; compile time is reported apart.")
    p.add_argument("--torch_compile_backend", default="inductor")
    p.add_argument("--channels_last", action="store_true", help="As train_yoso_lora.py.")
    p.add_argument("--lora_rank", type=int, default=None, help="Default: the config's.")
    p.add_argument("--teacher_num_inference_steps", type=int, default=1)
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="Measured steps per configuration.")
    p.add_argument("--no_flops", dest="flops", action="store_false", help="Skip the FLOP-counting steps.")
    p.add_argument("--peak_tflops", type=float, default=None, help="The device's dense 16-bit peak, for MFU.")
    p.add_argument("--cache_shard_size", type=int, default=16, help="Prompts per cache shard (small: reads cross shards).")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="cpu forces the CPU even with a GPU.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--exact_cpu_memory", action="store_true",
                   help="CPU: freed tensor memory goes back to the system at once, so RSS per phase follows live "
                        "memory (glibc's mmap threshold 64 KiB, as MALLOC_MMAP_THRESHOLD_=65536); slows the steps.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="JSON file (rewritten after every configuration); the Markdown tables go beside it (.md) at the end.")
    p.add_argument("--print_table", metavar="JSON", default=None, help="Only print the table of an earlier run's JSON.")
    p.add_argument("--check", action="store_true",
                   help="Only check the options and the config and list the configurations (gpu_run.sh --dry-run).")
    args = p.parse_args(argv)
    for name, value in (RECIPE if args.recipe else {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for chunks in args.discriminator_chunks:
        if chunks < 1 or (chunks > 1 and chunks % 2):
            p.error(f"--discriminator_chunks {chunks}: give 1 or an even number")
    for chunks in args.generator_chunks:
        if chunks < 1:
            p.error(f"--generator_chunks {chunks}: give 1 or more")
    args.cache = sorted(set(args.cache), key=["off", "on"].index)  # the teacher runs before it is freed
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.print_table:
        print(format_table(json.loads(Path(args.print_table).read_text())))
        return None
    config, _ = load_config(args.config)
    if args.batch_size is None:
        args.batch_size = [config.get("batch_size", 4)]
    if args.check:
        names = [config_name(*c) for c in configurations(args)]
        per_process = {k: getattr(args, k) for k in ("mixed_precision", "resolution", "lora_rank", "adam_fused",
                                                      "torch_compile", "channels_last", "exact_cpu_memory")}
        print(f"[bench] check: {config['name']} {per_process}: {', '.join(names)}")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exact_cpu_memory and (args.device == "cpu" or not torch.cuda.is_available()):
        if not return_freed_memory_at_once():
            sys.exit("bench_train_step.py: error: --exact_cpu_memory: glibc's mallopt is not available here")
    bench = Bench(args, config)
    report = bench.run()
    failed = [r["name"] for r in report["results"] if r["status"] == "error"]
    if failed:
        print(f"[bench] configurations that failed: {', '.join(failed)}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
