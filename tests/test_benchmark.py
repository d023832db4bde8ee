"""benchmarks/bench_train_step.py (issue 7): the tiny smoke run (numbers not asserted), the GPU script's
dry run, and that the benchmark builds what the training script builds, with the real models' shapes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "benchmarks" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_report(report, names, flops=True):
    assert [r["name"] for r in report["results"]] == names
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["median_seconds_per_step"] > 0 and r["peak_memory"] > 0
        assert r["memory_kind"] == "process_rss"
        phases = {"data", "teacher", "generator", "discriminator", "feature_net", "adversarial", "backward", "optimizer", "ema"}
        assert set(r["phases_median_seconds"]) == phases | {"other"}
        # Per-phase peaks (every phase ran, and the stretches between them); none above the overall peak.
        assert set(r["phase_peak_memory"]) == phases | {"other"}
        assert 0 < min(r["phase_peak_memory"].values()) and max(r["phase_peak_memory"].values()) <= r["peak_memory"]
        if flops:
            assert r["flops_per_step"] > 0 and r["model_flops_per_step"] > 0
            # Checkpointing recomputes: the step runs more FLOPs than the model's; without it, the same.
            assert (r["flops_per_step"] > r["model_flops_per_step"]) == r["gradient_checkpointing"]
            assert "mfu" not in r  # no dense peak known for a CPU
        first = r["step_order"] == "discriminator_first"
        chunks, pieces = r["discriminator_chunks"], min(r["generator_chunks"], r["batch_size"])
        # G: x_t with a graph, [x_td ; x_tp] without (discriminator_first: [x_t ; x_td ; x_tp] without, x_t with).
        # F: pred with a graph, the target without. D: its update in `chunks` passes, then G's output.
        # --generator_chunks: F on the target once, then on each piece of pred; D on every piece twice (the
        # batch-mean logit without gradient first, then each piece with it).
        passes = {"generator": 2, "feature_net": 2 if pieces == 1 else 1 + pieces,
                  "discriminator": chunks + (1 if pieces == 1 else 2 * pieces)}
        samples = {"generator": 4 if first else 3, "feature_net": 2, "discriminator": 3 if pieces == 1 else 4}
        if not r["cache"]:
            passes["teacher"], samples["teacher"] = 1, 1  # SD-Turbo: one teacher step
        assert r["unet_passes_per_step"] == passes | {"total": sum(passes.values())}
        assert r["unet_samples_per_prompt"] == samples
    assert report["device"]["type"] == "cpu"


def test_tiny_smoke_run(tmp_path):
    out = tmp_path / "tiny.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--config", "tiny", "--cache", "off", "on",
         "--warmup_steps", "1", "--steps", "1", "--threads", "1", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    check_report(report, ["bs4-gc_off-cache_off", "bs4-gc_off-cache_on"])
    cache = report["cache"]
    assert cache["prompts"] == 4 * 5 and cache["bytes_on_disk"] > 0 and "teacher_memory_freed" in cache
    # The markdown table renders from the JSON.
    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--print_table", str(out)],
                           capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO)
    assert table.returncode == 0 and "(cpu, " in table.stdout
    assert table.stdout.count("\n| 4 | off | off | generator_first | 1 |") == 3  # step, phase times, phase memory
    assert table.stdout.count("\n| 4 | off | on | generator_first | 1 |") == 3


def test_gpu_script_dry_run(tmp_path):
    """benchmarks/gpu_run.sh end to end on CPU with the tiny models: the GPU call cannot die on a typo."""
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=900, env={**ENV, "OUT": str(tmp_path), "PYTHON": sys.executable}, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_order_dryrun.json", "bench_order_dryrun.md", "fp16_e2e_cpuemulatedfp16.json",
        "fp16_e2e_cpuemulatedfp16_validation.png", "gpu_run.log"]
    e2e = json.loads((tmp_path / "fp16_e2e_cpuemulatedfp16.json").read_text())
    assert e2e["passed"] and len(e2e["checks"]) == 7 and all(e2e["checks"].values())
    assert max(e2e["resume"]["max_abs_difference"].values()) <= 1e-6  # CPU: exact
    assert len(e2e["losses"]["loss_kl"]) == e2e["steps"]
    order = json.loads((tmp_path / "bench_order_dryrun.json").read_text())
    check_report(order, ["bs2-gc_on-cache_off-dchunks2", "bs2-gc_on-cache_off-discriminator_first-dchunks2",
                         "bs2-gc_on-cache_off-dchunks2-gchunks4"])  # the last: --memory_flags with checkpointing
    log = (tmp_path / "gpu_run.log").read_text()
    assert "diffusers 0." in log and log.count("== configurations: ") == 1
    # The GPU calls' own options, checked: the recipe and every configuration each call will run.
    checks = [line for line in log.splitlines() if line.startswith("[bench] check: sd15 ")]
    assert len(checks) == 3
    recommended = {"off": ["bs16-gc_off-cache_off-discriminator_first-gchunks2"],  # memory_model.MEMORY_FLAGS
                   "on": ["bs16-gc_on-cache_off-dchunks2-gchunks4"]}
    assert checks[0].endswith(": " + ", ".join(name for g in ("off", "on") for name in [
        f"bs16-gc_{g}-cache_off{o}{c}" for o in ("", "-discriminator_first") for c in ("", "-dchunks2")] + recommended[g]))
    assert "'channels_last': True" in checks[1] and checks[1].endswith(": bs16-gc_off-cache_off, bs16-gc_on-cache_off")
    assert "'torch_compile': True" in checks[2] and "'mixed_precision': 'fp16'" in checks[2]


def test_recipe_is_the_published_setting():
    """--recipe: SPEC section 4's per-GPU setting; options given with it take precedence; bad chunks refused."""
    bench = bench_module()
    args = bench.parse_args(["--recipe"])
    assert (args.config, args.mixed_precision, args.batch_size, args.gradient_checkpointing, args.lora_rank,
            args.resolution) == ("sd15", "fp16", [16], ["on"], 64, 512)
    args = bench.parse_args(["--recipe", "--gradient_checkpointing", "off", "on", "--batch_size", "8"])
    assert (args.config, args.batch_size, args.gradient_checkpointing) == ("sd15", [8], ["off", "on"])
    args = bench.parse_args([])
    assert (args.config, args.mixed_precision, args.gradient_checkpointing) == ("tiny", "no", ["off"])
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--discriminator_chunks", "3"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--generator_chunks", "0"])
    assert exit_info.value.code == 2
    # --memory_flags adds the recommended configuration once, not when the sweep already has it.
    args = bench.parse_args(["--generator_chunks", "1", "4", "--discriminator_chunks", "2", "--gradient_checkpointing",
                             "on", "--memory_flags"])
    args.batch_size = [4]
    assert [bench.config_name(*c) for c in bench.configurations(args)] == [
        "bs4-gc_on-cache_off-dchunks2", "bs4-gc_on-cache_off-dchunks2-gchunks4"]


def test_mfu_uses_the_models_flops_and_the_cards_peak():
    """MFU = model FLOPs (no checkpointing recomputation) / s / dense peak; an earlier report without a model-FLOP
    count takes them from the same configuration without checkpointing. Values from the 2026-11-30 H200 run."""
    bench = bench_module()
    report = json.loads((REPO / "benchmarks" / "results" / "2026-11-30-h200" / "bench_sd15_h200.json").read_text())
    by_name = {r["name"]: r for r in report["results"]}
    off, on = by_name["bs16-gc_off-cache_off"], by_name["bs16-gc_on-cache_off"]
    assert bench.model_flops(report, on) == off["flops_per_step"] < on["flops_per_step"]
    assert abs(bench.mfu_of(report, off) - off["flops_per_step"] / off["median_seconds_per_step"] / 989.4e12) < 1e-12
    assert abs(bench.mfu_of(report, on) - 0.1325) < 0.001
    table = bench.format_table(report)
    assert "| MFU |" in table and "| 16 | on | off | generator_first | 1 | 1 | 0.993 |" in table and "13.3%" in table


def test_failed_configuration_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # accelerate's state is a process singleton; other tests set theirs
    GradientState._reset_state()
    bench = bench_module()
    args = bench.parse_args(["--config", "tiny", "--cache", "off", "--batch_size", "2", "--warmup_steps", "0",
                             "--steps", "1", "--no_flops", "--device", "cpu"])
    runner = bench.Bench(args, bench.load_config("tiny")[0])
    runner.report["device"] = runner.environment()
    runner.build()
    original = runner.models.feature_net.__class__.__call__

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(runner.models.feature_net.__class__, "__call__", out_of_memory)
    failed = runner.run_config(2, False, "off")
    assert failed["status"] == "oom" and "out of memory" in failed["error"] and "median_seconds_per_step" not in failed
    monkeypatch.setattr(runner.models.feature_net.__class__, "__call__", original)
    assert runner.run_config(2, True, "off")["status"] == "ok"


def folder_spec(path, pad_token):
    spec = {sub: json.loads((Path(path) / sub / "config.json").read_text()) for sub in ("unet", "vae", "text_encoder")}
    return spec | {"tokenizer_pad_token": pad_token}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_benchmark_builds_what_loading_builds(tiny_base, tiny_teacher, gradient_checkpointing):
    """Config-built parts assemble to the same modules, shapes, dtypes, trainable set and checkpointing flags
    as loaded ones (yoso.training.models.load_model_parts), through the same assembly."""
    from dataclasses import replace

    from yoso.training.models import assemble_models, load_model_parts

    bench = bench_module()
    config = {"name": "folders", "base": folder_spec(tiny_base, "<|endoftext|>"), "teacher": folder_spec(tiny_teacher, "!")}
    for weight_dtype in (torch.float32, torch.bfloat16):
        settings = bench.run_settings(config, 64, lora_rank=4)
        built = assemble_models(bench.build_parts(config, "cpu", weight_dtype), settings, device="cpu",
                                weight_dtype=weight_dtype)
        bench.set_gradient_checkpointing([built.unet, built.discriminator], gradient_checkpointing)
        loaded_settings = replace(settings, pretrained_model_name_or_path=tiny_base, pretrained_teacher_model=tiny_teacher,
                                  gradient_checkpointing=gradient_checkpointing)
        loaded = assemble_models(load_model_parts(loaded_settings, "cpu", weight_dtype), loaded_settings, device="cpu",
                                 weight_dtype=weight_dtype)
        assert built.latent_shape == loaded.latent_shape and built.weight_dtype == loaded.weight_dtype
        assert built.schedule.prediction_type == loaded.schedule.prediction_type
        assert torch.equal(built.schedule.alphas_cumprod, loaded.schedule.alphas_cumprod)
        pairs = [(built.unet, loaded.unet), (built.discriminator, loaded.discriminator),
                 (built.text_encoder, loaded.text_encoder), (built.vae, loaded.vae),
                 (built.latent_source.pipeline.unet, loaded.latent_source.pipeline.unet),
                 (built.latent_source.pipeline.text_encoder, loaded.latent_source.pipeline.text_encoder)]
        for a, b in pairs:
            describe = lambda m: [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()]  # noqa: E731
            assert describe(a) == describe(b)
            flags = lambda m: [(n, bool(getattr(x, "gradient_checkpointing", False))) for n, x in m.named_modules()]  # noqa: E731
            assert flags(a) == flags(b)
        assert type(built.latent_source.pipeline.scheduler) is type(loaded.latent_source.pipeline.scheduler)
        assert built.tokenizer("a photo of a cat").input_ids == loaded.tokenizer("a photo of a cat").input_ids


def test_configs_have_the_real_models_shapes():
    """sd15.json: SD1.5's and SD-Turbo's parameter counts (meta device, no memory); tiny.json: the test models."""
    bench = bench_module()
    counts = {}
    for name in ("sd15", "tiny", "mid"):
        config = bench.load_config(name)[0]
        for which in ("base", "teacher"):
            _, text_encoder, vae, unet = bench.build_pipeline_parts(config[which], "meta")
            counts[name, which] = tuple(bench.count_parameters(m) for m in (unet, text_encoder, vae))
    # diffusers' SD1.5 UNet / CLIP ViT-L text encoder / VAE; SD2.1 UNet / OpenCLIP ViT-H text (23 layers).
    assert counts["sd15", "base"] == (859_520_964, 123_060_480, 83_653_863)
    assert counts["sd15", "teacher"][:2] == (865_910_724, 340_387_840)
    for which in ("base", "teacher"):
        assert counts["tiny", which][0] < 5e6 and counts["mid", which][0] < 60e6


def test_tiny_config_is_the_test_models(tiny_base, tiny_teacher):
    bench = bench_module()
    config = bench.load_config("tiny")[0]
    for which, path in (("base", tiny_base), ("teacher", tiny_teacher)):
        folder = folder_spec(path, None)
        for sub in ("unet", "vae", "text_encoder"):
            mine = config[which][sub]
            assert {k: v for k, v in folder[sub].items() if k in mine and not k.startswith("_")} == \
                   {k: (list(v) if isinstance(v, tuple) else v) for k, v in mine.items() if not k.startswith("_")}, (which, sub)
