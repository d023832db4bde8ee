#!/usr/bin/env python
"""Benchmark of the YOSO training step: seconds per optimizer step, peak memory, UNet passes, phases, FLOPs.

Runs the project's own step (``yoso.step.YOSOTrainingStep.step``, the code ``train_yoso_lora.py`` calls)
on models built from the JSON configs in ``benchmarks/configs`` with random weights (no download):

    tiny   the test models (CI smoke check)
    mid    SD1.5's / SD-Turbo's block layouts with narrow channels (a few minutes on 2 CPU cores)
    sd15   full SD1.5 base + SD-Turbo (SD2.1 UNet, OpenCLIP ViT-H text) teacher shapes, for a GPU

Each option below that takes several values runs every combination, building the models once:

    python benchmarks/bench_train_step.py --config mid --cache off on --output benchmarks/results_mid_cpu.json
    python benchmarks/bench_train_step.py --config sd15 --mixed_precision fp16 --batch_size 4 16 \
        --gradient_checkpointing off on --cache off on --output bench_sd15.json

One measured step is what one optimizer step of ``train_yoso_lora.py`` runs (gradient accumulation 1):
fetching the batch (tokenizing; with the cache, reading the latents by index) and ``trainer.step``.
"cache on" trains from a teacher-latent cache written by the same code as ``precompute_teacher_latents.py``
(built once, before the cache-on configurations, then the teacher is freed), so it shows both the time
saved per step and the memory freed. Phases are timed with a device synchronize at each boundary.
Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the process RSS (sampled every 10 ms)
on CPU. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` around one extra step (forward,
backward and optimizer; recomputation under gradient checkpointing included).

The run is built by the training script's own builder (``yoso.run.build_run``) from config-built parts
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

from yoso.atomic import atomic_path  # noqa: E402
from yoso.precision import weight_dtype_for  # noqa: E402

PHASES = ("data", "teacher", "generator", "feature_net", "discriminator", "backward", "optimizer", "ema")

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
    """An SD-Turbo-shaped pipeline from ``spec``, placed as ``yoso.teacher.load_teacher`` places a loaded one."""
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
    """``yoso.models.ModelParts`` of a config: the base model's pieces and the teacher, random weights."""
    from diffusers import DDPMScheduler

    from yoso.models import ModelParts
    from yoso.testing import SD15_SCHEDULER_CONFIG

    tokenizer, text_encoder, vae, unet = build_pipeline_parts(config["base"], device)
    teacher = build_teacher_pipeline(config["teacher"], device, weight_dtype) if with_teacher else None
    return ModelParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG), teacher_pipeline=teacher)


def run_settings(config, resolution, lora_rank, teacher_num_inference_steps=1, **overrides):
    """The training script's settings for a benchmark run. Gradient checkpointing is always *enabled*
    before D copies the encoder (so D's blocks can checkpoint); ``set_gradient_checkpointing`` flips it."""
    from yoso.run import RunSettings

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
    """``timer(phase)`` for ``YOSOTrainingStep``: accumulates wall time per phase, synchronizing the device."""

    def __init__(self, device):
        self.device = device
        self.totals = {}

    def reset(self):
        self.totals = {}

    @contextmanager
    def __call__(self, phase):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start


class PeakRSS:
    """Peak resident set size of this process while running (a polling thread)."""

    def __init__(self, interval=0.01):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def current(self):
        return self.process.memory_info().rss

    def __enter__(self):
        self.peak = self.current()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

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
    return None


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
        from yoso.lora import lora_named_parameters
        from yoso.run import build_run

        args = self.args
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        # The teacher is always built: cache-off configurations run it, and it writes the cache for cache-on ones.
        parts = build_parts(self.config, self.device, self.weight_dtype)
        settings = run_settings(self.config, self.resolution, self.lora_rank, args.teacher_num_inference_steps,
                                use_ema=True, learning_rate=1e-5, use_8bit_adam=args.use_8bit_adam, seed=args.seed)
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
        return max(self.args.batch_size) * (self.args.warmup_steps + self.args.steps + 1)

    def build_cache(self):
        """Write a teacher-latent cache with the project's precompute code, then free the teacher."""
        from yoso.latent_cache import LatentCacheReader, make_cache_settings, precompute_latents, text_dtype, write_cache_info

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
    def run_config(self, batch_size, gradient_checkpointing, cache):
        from yoso.data import ShardedPromptSampler, tokenize_prompts
        from yoso.step import NonFiniteLossError, no_timer, step_generator

        args, m, accelerator = self.args, self.models, self.accelerator
        name = f"bs{batch_size}-gc_{'on' if gradient_checkpointing else 'off'}-cache_{cache}"
        result = {"name": name, "batch_size": batch_size, "resolution": self.resolution,
                  "gradient_checkpointing": gradient_checkpointing, "cache": cache == "on",
                  "mixed_precision": accelerator.mixed_precision, "use_8bit_adam": args.use_8bit_adam}
        set_gradient_checkpointing([self.unet_module, self.discriminator_module], gradient_checkpointing)
        timer = PhaseTimer(self.device)
        trainer = self.run.trainer
        trainer.timer = timer
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
                trainer.step(batch, step_generator(args.seed, i, 0))

        seconds, phases = [], []
        status = "ok"
        try:
            for i in range(args.warmup_steps):
                one_step(i)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            result["resident_memory"] = self.memory_now()
            rss = PeakRSS() if not self.cuda else None
            if rss is not None:
                rss.__enter__()
            self.passes.reset()
            self.passes.active = True
            try:
                for i in range(args.warmup_steps, args.warmup_steps + args.steps):
                    timer.reset()
                    synchronize(self.device)
                    start = time.perf_counter()
                    one_step(i)
                    synchronize(self.device)
                    seconds.append(time.perf_counter() - start)
                    phases.append(dict(timer.totals))
            finally:
                self.passes.active = False
                if rss is not None:
                    rss.__exit__(None, None, None)
            result["peak_memory"] = torch.cuda.max_memory_allocated(self.device) if self.cuda else rss.peak
            result["memory_kind"] = self.memory_kind()
            if args.flops:
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                with counter:
                    one_step(args.warmup_steps + args.steps)
                result["flops_per_step"] = int(counter.get_total_flops())
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
                    result["utilization_of_peak"] = result["achieved_tflops"] / peak
        return result

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

    def write(self):
        if not self.args.output:
            return
        with atomic_path(self.args.output) as tmp:
            tmp.write_text(json.dumps(self.report, indent=2) + "\n")

    def run(self):
        args = self.args
        self.report["device"] = self.environment()
        self.report["config"] = self.config["name"]
        self.report["settings"] = {
            "resolution": self.resolution, "lora_rank": self.lora_rank, "mixed_precision": self.accelerator.mixed_precision,
            "weight_dtype": str(self.weight_dtype), "warmup_steps": args.warmup_steps, "measured_steps": args.steps,
            "teacher_num_inference_steps": args.teacher_num_inference_steps, "use_8bit_adam": args.use_8bit_adam,
            "use_ema": True, "seed": args.seed, "command": " ".join(sys.argv),
        }
        self.report["results"] = []
        self.write()
        self.build()
        self.write()
        print(f"[bench] {self.config['name']} on {self.report['device']['name']} ({self.device.type}), "
              f"built in {self.build_seconds:.1f}s", flush=True)
        for cache in args.cache:
            if cache == "on" and self.reader is None:
                self.build_cache()
                self.write()
                c = self.report["cache"]
                print(f"[bench] cache: {c['prompts']} prompts in {c['build_seconds']:.1f}s; freeing the teacher freed "
                      f"{c['teacher_memory_freed'] / 2**20:.0f} MiB ({c['memory_kind']})", flush=True)
            for batch_size in args.batch_size:
                for gc_mode in args.gradient_checkpointing:
                    result = self.run_config(batch_size, gc_mode == "on", cache)
                    self.report["results"].append(result)
                    self.write()
                    print(f"[bench] {format_result(result)}", flush=True)
        print(format_table(self.report), flush=True)
        return self.report


def size(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def format_result(r):
    if r["status"] != "ok":
        return f"{r['name']}: {r['status']} ({r.get('error', '')})"
    mib = r["peak_memory"] / 2**20
    flops = f", {r['achieved_tflops']:.2f} TFLOP/s" if "achieved_tflops" in r else ""
    return f"{r['name']}: {r['median_seconds_per_step']:.3f} s/step, peak {mib:.0f} MiB{flops}"


def format_table(report):
    """The results as a Markdown table (the README's performance section uses this)."""
    device = report["device"]
    where = f"{device['name']} ({device['type']}" + (f", {device.get('cpu_count')} cores" if device["type"] == "cpu" else "") + ")"
    lines = [f"{report['config']} on {where}, {report['settings']['mixed_precision']} mixed precision, "
             f"{report['settings']['resolution']} px, LoRA rank {report['settings']['lora_rank']}",
             "",
             "| batch | grad. ckpt | cache | s/step | img/s | peak mem (GiB) | text enc. + teacher | G fwd | F fwd | D (fwd+upd) "
             "| G backward | optim+EMA | data | GFLOP/step | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        head = f"| {r['batch_size']} | {'on' if r['gradient_checkpointing'] else 'off'} | {'on' if r['cache'] else 'off'} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status'].upper()} |" + " |" * 12)
            continue
        p = r["phases_median_seconds"]
        flops = r.get("flops_per_step")
        flop_cells = f"| {flops / 1e9:.1f} | {r['achieved_tflops']:.3f} |" if flops else "| - | - |"
        lines.append(
            head + f"| {r['median_seconds_per_step']:.3f} | {r['images_per_second']:.2f} | {r['peak_memory'] / 2**30:.2f} "
            f"| {p['teacher']:.3f} | {p['generator']:.3f} | {p['feature_net']:.3f} | {p['discriminator']:.3f} "
            f"| {p['backward']:.3f} | {p['optimizer'] + p['ema']:.3f} | {p['data']:.3f} " + flop_cells)
    if "cache" in report:
        c = report["cache"]
        lines += ["", f"Cache: built for {c['prompts']} prompts in {c['build_seconds']:.2f} s "
                      f"({c['seconds_per_prompt'] * 1e3:.1f} ms/prompt, {c['bytes_on_disk'] / c['prompts'] / 1024:.1f} KiB/prompt "
                      f"on disk); freeing the teacher ({size(c['teacher_weight_bytes'])} of weights) released "
                      f"{size(c['teacher_memory_freed'])} ({c['memory_kind']})."]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    if ok:
        r = ok[0]
        passes = ", ".join(f"{k} {v:g}" for k, v in r["unet_passes_per_step"].items())
        lines += [f"UNet passes per step ({r['name']}): {passes}."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the YOSO training step on config-built random-weight models.")
    p.add_argument("--config", default="tiny", help="tiny, mid, sd15, or a path to a JSON config.")
    p.add_argument("--batch_size", type=int, nargs="+", default=None, help="Prompts per step (default: the config's).")
    p.add_argument("--resolution", type=int, default=None, help="Default: the config's.")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient_checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--cache", nargs="+", default=["off"], choices=["off", "on"],
                   help="off: the teacher runs every step; on: latents from a teacher-latent cache (teacher freed).")
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit for the LoRA (CUDA).")
    p.add_argument("--lora_rank", type=int, default=None, help="Default: the config's.")
    p.add_argument("--teacher_num_inference_steps", type=int, default=1)
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="Measured steps per configuration.")
    p.add_argument("--no_flops", dest="flops", action="store_false", help="Skip the FLOP-counting step.")
    p.add_argument("--peak_tflops", type=float, default=None, help="The device's peak, for the utilization column.")
    p.add_argument("--cache_shard_size", type=int, default=16, help="Prompts per cache shard (small: reads cross shards).")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="cpu forces the CPU even with a GPU.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON file (rewritten after every configuration).")
    p.add_argument("--print_table", metavar="JSON", default=None, help="Only print the table of an earlier run's JSON.")
    args = p.parse_args(argv)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args, config)
    report = bench.run()
    failed = [r["name"] for r in report["results"] if r["status"] == "error"]
    if failed:
        print(f"[bench] configurations that failed: {', '.join(failed)}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
