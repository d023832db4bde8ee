"""train_yoso_lora.py end to end under `accelerate launch` on the tiny models (issue 3, items 7-12)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import REPO, launch, tiny_train_args, write_prompts
from yoso.method.lora import DEFAULT_TARGET_MODULES, add_lora, module_matches_target

STEPS = 6


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")


@pytest.fixture(scope="module")
def run_a(tiny_base, tiny_teacher, prompts_file, tmp_path_factory):
    """One process, EMA, checkpoints every 2 steps (2 kept), validation every 3 steps, tensorboard."""
    root = tmp_path_factory.mktemp("run_a")
    out, dump = root / "out", root / "dump"
    result = launch(tiny_train_args(
        tiny_base, tiny_teacher, prompts_file, out, steps=STEPS, use_ema=True, ema_decay=0.5,
        checkpointing_steps=2, checkpoints_total_limit=2, validation_prompts=["a cat", "a dog"],
        validation_steps=3, report_to="tensorboard"), dump=dump)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, dump, result


def test_outputs_and_checkpoint_pruning(run_a):
    out, _, result = run_a
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "non_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    for name in ("pytorch_lora_weights.safetensors", "discriminator.safetensors", "optimizer.bin", "optimizer_1.bin",
                 "scheduler.bin", "random_states_0.pkl"):
        assert (out / "checkpoint-6" / name).is_file(), name
    stats = load_file(out / "latent_stats.safetensors")
    assert stats["mean"].shape == (4, 8, 8) and stats["std"].shape == () and stats["count"].item() == STEPS * 4
    assert stats["std"].item() > 0
    # The progress bar shows the losses.
    assert "loss_con=" in result.stderr and "loss_adv=" in result.stderr


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 499]), c).sample


def trained_unet(tiny_base, tensors_by_name):
    from diffusers import UNet2DConditionModel

    unet = add_lora(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"), rank=4, alpha=8)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors_by_name.items():
            params[name].copy_(value)
    return unet


def test_load_lora_weights_reproduces_trained_unet(run_a, tiny_base):
    from diffusers import StableDiffusionPipeline

    out, dump, _ = run_a
    live = {k[len("lora."):]: v for k, v in load_file(dump / "rank0.safetensors").items() if k.startswith("lora.")}
    ema_state = torch.load(out / "checkpoint-6" / "custom_checkpoint_2.pkl", weights_only=False)
    ema = dict(zip(ema_state["names"], ema_state["shadow"]))
    base_pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    base_out = unet_output(base_pipe.unet)
    for folder, tensors in ((out / "non_ema", live), (out, ema)):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
        pipe.load_lora_weights(str(folder))
        reference = unet_output(trained_unet(tiny_base, tensors))
        assert (unet_output(pipe.unet) - reference).abs().max().item() <= 1e-5
        assert (unet_output(pipe.unet) - base_out).abs().max().item() > 1e-4
        loaded_types = {t for name, m in pipe.unet.named_modules() if getattr(m, "lora_A", None)
                        for t in DEFAULT_TARGET_MODULES if module_matches_target(name, t)}
        assert loaded_types == set(DEFAULT_TARGET_MODULES)
    # EMA and raw LoRA differ (decay 0.5 over 6 steps).
    assert max((ema[k] - live[k]).abs().max().item() for k in live) > 0


# Library messages that tell a user of this script nothing (issue 12, item 12).
LIBRARY_NOISE = ("should be kept in float32", "were initialized from the model checkpoint", "requires torchvision",
                 "skip_prk_steps", "was not found in config")


def test_a_run_prints_progress_and_results_not_library_noise(run_a):
    _, _, result = run_a
    output = result.stdout + result.stderr
    noise = [line for line in output.splitlines() if any(text in line for text in LIBRARY_NOISE)]
    assert not noise, noise
    assert "steps: 100%" in result.stderr and "LoRA written to" in result.stderr and "validation images:" in result.stderr


def test_checkpoints_hold_the_settings_a_resume_must_keep(run_a, tiny_base):
    from diffusers import UNet2DConditionModel

    from yoso.training.checkpoint import RESUME_FIXED_SETTINGS, read_run_settings, unet_architecture

    record = read_run_settings(run_a[0] / "checkpoint-6")
    assert record["settings"] == {"resolution": 64, "lora_rank": 4, "lora_alpha": 8.0,
                                  "lora_target_modules": sorted(DEFAULT_TARGET_MODULES), "use_ema": True,
                                  "use_8bit_adam": False}
    assert set(record["settings"]) == set(RESUME_FIXED_SETTINGS)
    assert record["pretrained_model_name_or_path"] == tiny_base and record["grad_scalers"] is False
    assert record["base_unet"] == unet_architecture(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").config)


@pytest.fixture(scope="module")
def other_base(tiny_base, tmp_path_factory):
    """A base whose UNet has another architecture (2 layers per block): only its configs, as the preflight reads."""
    folder = tmp_path_factory.mktemp("other_base")
    for sub in ("unet", "vae"):
        (folder / sub).mkdir()
        config = json.loads((Path(tiny_base) / sub / "config.json").read_text())
        if sub == "unet":
            config["layers_per_block"] = 2
        (folder / sub / "config.json").write_text(json.dumps(config))
    return str(folder)


RESUME_CONFLICTS = {
    "lora_rank": ({"lora_rank": 8}, ["--lora_rank 8: ", "was trained with 4", "resume with --lora_rank 4"]),
    "lora_alpha": ({"lora_alpha": 16}, ["--lora_alpha 16.0: ", "was trained with 8.0"]),
    "use_ema left out": ({"use_ema": None}, ["--use_ema off: ", "was trained with on"]),
    "resolution": ({"resolution": 128}, ["--resolution 128: ", "was trained with 64"]),
    "target modules": ({"lora_target_modules": "to_q,to_k,to_v,to_out.0"}, ["--lora_target_modules to_k,to_out.0,to_q,to_v: "]),
    "another base": ({"pretrained_model_name_or_path": "other"}, ["its UNet is not the one", "layers_per_block 1 there, 2 here"]),
}


@pytest.mark.parametrize("case", sorted(RESUME_CONFLICTS))
def test_resume_with_changed_shape_flags_is_refused_in_one_line(case, run_a, tiny_base, tiny_teacher, prompts_file,
                                                                 other_base, tmp_path, capsys):
    from train_yoso_lora import main

    changes, fragments = RESUME_CONFLICTS[case]
    values = {"use_ema": True, "ema_decay": 0.5, "resume_from_checkpoint": run_a[0] / "checkpoint-6", **changes}
    base = other_base if values.pop("pretrained_model_name_or_path", None) else tiny_base
    extra = {k: v for k, v in values.items() if v is not None}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in tiny_train_args(base, tiny_teacher, prompts_file, out, **extra)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("train_yoso_lora.py: error: ") and str(run_a[0] / "checkpoint-6") in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


def test_resume_by_name_with_free_flags_changed_passes_check_only(run_a, tiny_base, tiny_teacher, prompts_file):
    out = run_a[0]
    before = file_hashes(out)
    # The checkpoint by its name in --output_dir; learning rate, steps and logging may change on resume.
    args = tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, steps=20, use_ema=True, learning_rate=5e-4,
                           resume_from_checkpoint="checkpoint-6", checkpointing_steps=5, report_to="none")
    result = run_script(args + ["--check_only"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {out / 'checkpoint-6'}" in result.stdout
    assert file_hashes(out) == before  # --check_only writes nothing


def test_validation_grid_and_tracker_scalars(run_a):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run_a
    for step in (3, 6):
        grid = Image.open(out / "validation" / f"step-{step:06d}.png")
        assert grid.size == (4 * 64, 2 * 64)  # 4 columns (LoRA/EMA x 1/2 steps), one row per prompt
    assert "ema 2-step" in (out / "validation" / "README.txt").read_text()
    events = EventAccumulator(str(out / "logs" / "yoso-lora"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss_con", "loss_kl", "loss_adv", "loss_d", "d_real", "d_fake", "lr", "grad_norm", "nonfinite_steps"} <= scalars
    assert [e.value for e in events.Scalars("nonfinite_steps")] == [0] * STEPS
    assert len(events.Scalars("loss_kl")) == STEPS
    # One tiled image event per validation: the 8 images (2 prompts x 4 columns) side by side.
    image_events = events.Images("validation")
    assert [e.step for e in image_events] == [3, 6]
    assert all((e.width, e.height) == (8 * 64, 64) for e in image_events)


def test_resume_matches_uninterrupted_run(run_a, tiny_base, tiny_teacher, prompts_file, tmp_path):
    out_a, _, _ = run_a
    out_b = tmp_path / "out_b"
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-4", out_b / "checkpoint-4")
    (out_b / "checkpoint-5.incomplete").mkdir()  # a write that never finished: `latest` must skip it
    (out_b / "checkpoint-5.incomplete" / "optimizer.bin").write_bytes(b"partial")
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, out_b, steps=STEPS, use_ema=True,
                                    ema_decay=0.5, checkpointing_steps=2, resume_from_checkpoint="latest",
                                    report_to="none"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "checkpoint-4" in result.stderr
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors",
                 "latent_stats.safetensors", "checkpoint-6/discriminator.safetensors"):
        a, b = load_file(out_a / name), load_file(out_b / name)
        assert a.keys() == b.keys()
        assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6, name
    opt_a = torch.load(out_a / "checkpoint-6" / "optimizer_1.bin", weights_only=False)
    opt_b = torch.load(out_b / "checkpoint-6" / "optimizer_1.bin", weights_only=False)
    for key in opt_a["state"]:
        torch.testing.assert_close(opt_b["state"][key]["exp_avg_sq"], opt_a["state"][key]["exp_avg_sq"], atol=1e-6, rtol=0)


def test_two_processes_hold_identical_weights(tiny_base, tiny_teacher, prompts_file, tmp_path):
    out, dump = tmp_path / "out", tmp_path / "dump"
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, steps=3, train_batch_size=2,
                                    gradient_accumulation_steps=2, use_ema=True, checkpointing_steps=3,
                                    report_to="none"),
                    num_processes=2, dump=dump)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Backend: gloo" in result.stderr and "[RANK 1]" in result.stderr
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    # The ranks trained on disjoint prompts: 3 steps x 2 micro-steps x 2 prompts each, 12 distinct of the 48.
    seen = [json.loads((dump / f"rank{r}_indices.json").read_text()) for r in (0, 1)]
    assert [len(batches) for batches in seen] == [6, 6] and all(len(b) == 2 for batches in seen for b in batches)
    flat = [[i for b in batches for i in b] for batches in seen]
    assert len(set(flat[0])) == len(set(flat[1])) == 12 and not set(flat[0]) & set(flat[1])
    assert rank0.keys() == rank1.keys() and any(k.startswith("d.") for k in rank0)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    saved_d = load_file(out / "checkpoint-3" / "discriminator.safetensors")
    assert all(torch.equal(saved_d[k], rank0["d." + k]) for k in saved_d)
    saved_lora = load_file(out / "non_ema" / "pytorch_lora_weights.safetensors")
    live = {"unet." + k[len("lora."):].replace(".default", ""): v for k, v in rank0.items() if k.startswith("lora.")}
    assert saved_lora.keys() == live.keys()
    assert all(torch.equal(saved_lora[k], live[k]) for k in live)
    assert load_file(out / "latent_stats.safetensors")["count"].item() == 3 * 2 * 2 * 2  # steps x accum x batch x ranks


def file_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_nan_loss_stops_and_leaves_outputs_untouched(run_a, tiny_base, tiny_teacher, prompts_file, tmp_path):
    # A teacher whose UNet outputs NaN makes NaN latents, hence NaN losses at the first step.
    nan_teacher = tmp_path / "nan_teacher"
    shutil.copytree(tiny_teacher, nan_teacher)
    weights_file = nan_teacher / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, weights_file)
    out = tmp_path / "out"
    shutil.copytree(run_a[0], out)
    before = file_hashes(out)
    result = launch(tiny_train_args(tiny_base, str(nan_teacher), prompts_file, out, steps=STEPS + 2, use_ema=True,
                                    ema_decay=0.5, checkpointing_steps=1, resume_from_checkpoint="checkpoint-6",
                                    max_nonfinite_steps=1, report_to="none"))  # found inside --output_dir
    assert result.returncode == 1
    message = [line for line in result.stderr.splitlines() if line.startswith("train_yoso_lora.py: error:")]
    assert len(message) == 1 and "at step 7" in message[0] and "not finite" in message[0]
    assert "checkpoint-6" in message[0]
    assert file_hashes(out) == before


def run_script(args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "train_yoso_lora.py")] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jsonl").write_text("\n\n")
    (root / "malformed.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n')
    (root / "other_field.jsonl").write_text('{"caption": "a"}\n')
    wide = root / "wide_teacher"
    for sub in ("unet", "vae"):
        (wide / sub).mkdir(parents=True)
        config = json.loads((Path(tiny_teacher) / sub / "config.json").read_text())
        config["in_channels" if sub == "unet" else "latent_channels"] = 16
        (wide / sub / "config.json").write_text(json.dumps(config))
    return root


BAD_CASES = {
    "missing prompt file": ({"train_data": "{root}/nope.jsonl"}, ["--train_data", "no such file"]),
    "empty prompt file": ({"train_data": "{root}/empty.jsonl"}, ["--train_data", "no prompts"]),
    "malformed json line": ({"train_data": "{root}/malformed.jsonl"}, ["malformed.jsonl:3: malformed JSON"]),
    "missing caption column": ({"train_data": "{root}/other_field.jsonl"}, ["--caption_column"]),
    "resolution": ({"resolution": "72"}, ["--resolution 72", "multiple of 16"]),
    "base path": ({"pretrained_model_name_or_path": "./no/such/model"}, ["--pretrained_model_name_or_path ./no/such/model", "no such folder"]),
    "unreachable hub id": ({"pretrained_model_name_or_path": "someone/not-cached"}, ["--pretrained_model_name_or_path someone/not-cached", "not a local folder"]),
    "teacher latent space": ({"pretrained_teacher_model": "{root}/wide_teacher"}, ["--pretrained_teacher_model", "takes 16"]),
    "lora target": ({"lora_target_modules": ["to_q", "to_qq"]}, ["--lora_target_modules", "to_qq"]),
    "xformers": ({"enable_xformers_memory_efficient_attention": True}, ["--enable_xformers_memory_efficient_attention", "not installed"]),
    "bitsandbytes": ({"use_8bit_adam": True}, ["--use_8bit_adam", "not installed"]),
    "fp16 without a GPU": ({"mixed_precision": "fp16"}, ["--mixed_precision fp16 needs a GPU", "bf16"]),
    "resume path": ({"resume_from_checkpoint": "{root}/checkpoint-7"}, ["--resume_from_checkpoint", "no such checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_in_one_line_before_loading(case, bad_inputs, tiny_base, tiny_teacher, prompts_file):
    overrides, expected = BAD_CASES[case]
    values = {"pretrained_model_name_or_path": tiny_base, "pretrained_teacher_model": tiny_teacher,
              "train_data": prompts_file, "resolution": "64", "output_dir": str(bad_inputs / f"out_{case}"),
              "max_train_steps": "2", "report_to": "none"}
    values.update({k: (v.format(root=bad_inputs) if isinstance(v, str) else v) for k, v in overrides.items()})
    args = []
    for key, value in values.items():
        if value is True:
            args.append("--" + key)
        elif isinstance(value, list):
            args += ["--" + key, *value]
        else:
            args += ["--" + key, value]
    result = run_script(args)
    assert result.returncode == 2  # bad input, as argparse's own errors
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("train_yoso_lora.py: error:")
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not Path(values["output_dir"]).exists()  # nothing written, no model loaded


# The published README's command (../shared/seed-README.md), flag for flag, minus xformers (CUDA-only).
PUBLISHED_COMMAND = ("--pretrained_model_name_or_path=runwayml/stable-diffusion-v1-5 --use_ema --train_batch_size=16 "
                     "--gradient_accumulation_steps=4 --gradient_checkpointing --max_train_steps=5000 "
                     "--learning_rate=2e-05 --max_grad_norm=1")


def readme_train_command():
    """The flags of the `accelerate launch ... train_yoso_lora.py` command in README.md's Train section."""
    import shlex

    text = (REPO / "README.md").read_text()
    block = text.split("## Train", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = next(line for line in block.replace("\\\n", " ").splitlines() if "train_yoso_lora.py" in line)
    words = shlex.split(command)
    return words[words.index("train_yoso_lora.py") + 1:]


def test_published_and_readme_commands_parse_to_the_recipe():
    from train_yoso_lora import parse_args

    published = parse_args(PUBLISHED_COMMAND.split())
    readme = parse_args(readme_train_command())
    for args in (published, readme):
        # SPEC section 4: the recipe's values, and the defaults the published command relies on.
        assert (args.train_batch_size, args.gradient_accumulation_steps, args.max_train_steps) == (16, 4, 5000)
        assert args.learning_rate == 2e-5 and args.max_grad_norm == 1 and args.use_ema and args.gradient_checkpointing
        assert (args.lora_rank, args.lora_alpha, args.lambda_con, args.lambda_kl, args.snr_gamma) == (64, 8, 2, 0.5, 5)
        assert (args.lambda_adv, args.consistency_loss, args.kl_loss, args.input_perturbation) == (1.0, "lpl", "mse", 0)
        assert (args.coop_gap, args.consistency_gap, args.ema_decay, args.gan_loss_reduction) == (250, 25, 0.999, "batch")
        assert args.pretrained_model_name_or_path == "runwayml/stable-diffusion-v1-5"
    assert published.pretrained_teacher_model == readme.pretrained_teacher_model == "stabilityai/sd-turbo"
    assert published.train_data == readme.train_data == "train_anno.jsonl"
    assert published.resolution == readme.resolution == 512
    assert readme.validation_prompts and readme.checkpoints_total_limit == 3


def test_one_non_finite_step_is_skipped_and_the_run_finishes(tiny_base, tiny_teacher, prompts_file, tmp_path):
    """A teacher-latent cache whose second batch is inf: that step's updates are skipped, logged and counted;
    the run goes on to the end with finite weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from yoso.data.latent_cache import shard_file_name

    cache = tmp_path / "cache"
    result = launch(["--pretrained_model_name_or_path", tiny_base, "--pretrained_teacher_model", tiny_teacher,
                     "--train_data", prompts_file, "--resolution", "64", "--seed", "0", "--output_dir", cache,
                     "--shard_size", "4", "--train_batch_size", "4"],
                    script="precompute_teacher_latents.py")
    assert result.returncode == 0, result.stderr[-3000:]
    shard = cache / shard_file_name(0, 1)  # shard size = batch size: shard 1 is exactly the second batch
    tensors = load_file(shard)
    tensors["latents"] = torch.full_like(tensors["latents"], float("inf"))
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, shard, metadata=metadata)

    out = tmp_path / "out"
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, steps=4, use_ema=True,
                                    teacher_latent_cache=cache, checkpointing_steps=100, report_to="tensorboard"))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "update was skipped" in line]
    assert len(warnings) == 1 and "step 2:" in warnings[0], warnings
    for name in ("pytorch_lora_weights.safetensors", "non_ema/pytorch_lora_weights.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(out / name).values())
    stats = load_file(out / "latent_stats.safetensors")
    assert stats["count"].item() == 3 * 4 and torch.isfinite(stats["mean"]).all()  # the inf batch left out
    events = EventAccumulator(str(out / "logs" / "yoso-lora"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("nonfinite_steps")] == [0, 1, 1, 1]


def test_method_doc_states_the_defaults_that_differ_from_the_release():
    """docs/method.md's list of defaults that differ from the released script matches our parser."""
    from pathlib import Path

    from train_yoso_lora import parse_args

    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    section = text.split("## Differences from the authors' script", 1)[1].split("\n## ", 1)[0]
    defaults = parse_args(["--train_data", "p.jsonl"])
    assert defaults.learning_rate == 2e-5 and defaults.resume_from_checkpoint is None
    assert "default `--learning_rate` is 1e-4; ours is 2e-5" in section
    assert "`--resume_from_checkpoint` defaults to `latest`" in section and "ours starts fresh" in section
    assert "`D_final_loss = errD_real`" in section and "**the whole discriminator loss**" in section


def test_card_and_upload_name_only_this_runs_validation_grids(run_a, tiny_base, tiny_teacher, prompts_file, tmp_path):
    """A new run into a folder an earlier run validated in: the earlier grids stay on disk, but the card and the
    upload name only the new run's (validation/grids.json); a resumed run keeps the grids of the run it continues."""
    from yoso.outputs.output_files import hub_files

    earlier = {"validation/step-000003.png", "validation/step-000006.png"}
    assert earlier <= set(hub_files(run_a[0]))
    rerun = tmp_path / "rerun"
    shutil.copytree(run_a[0], rerun)
    for name in [p.name for p in rerun.iterdir() if p.name.startswith("checkpoint")]:
        shutil.rmtree(rerun / name)
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, rerun, steps=2, use_ema=True,
                                    validation_prompts=["a cat"], validation_steps=2, report_to="none"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert earlier <= {f"validation/{p.name}" for p in (rerun / "validation").iterdir()}  # nothing deleted
    uploaded = set(hub_files(rerun))
    assert {p for p in uploaded if p.startswith("validation/")} == {"validation/README.txt", "validation/step-000002.png"}
    assert "validation/step-000003.png" not in (rerun / "README.md").read_text()

    resumed = tmp_path / "resumed"
    shutil.copytree(run_a[0], resumed)
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, resumed, steps=STEPS, use_ema=True,
                                    ema_decay=0.5, resume_from_checkpoint="latest", report_to="none"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert earlier | {"validation/README.txt"} == {p for p in hub_files(resumed) if p.startswith("validation/")}
