"""inference_examples.py and yoso/evaluation/inference.py on the tiny SD1.5-shaped pipeline: every mode, the LoRA's
effect, --fuse_lora, the informative prior (IPI) and its statistics file, one-line errors, and the usage
snippets of docs/inference.md and the README, executed with the hub ids swapped for tiny local folders."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference_examples
from yoso.evaluation import inference as yi
from yoso.data import latent_stats as ls
from yoso.data.latent_stats import LATENT_STATS_NAME
from yoso.method.lora import LORA_WEIGHT_NAME

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # the tiny pipelines' resolution
PROMPT = "A photo of a man, XT3"


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def lora_dir(tiny_base, tiny_teacher, tmp_path_factory):
    """A short run of train_yoso_lora.py: its --output_dir holds the LoRA and latent_stats.safetensors.

    A high learning rate so that 10 steps move the LoRA far enough to change the tiny model's images.
    Every test reaches the LoRA only through this fixture."""
    from harness import launch, tiny_train_args, write_prompts

    root = tmp_path_factory.mktemp("trained_lora")
    prompts = write_prompts(root / "prompts.jsonl")
    out = root / "out"
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts, out, steps=10, learning_rate="2e-2",
                                    checkpointing_steps=1000, report_to="none"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def base_only_image(tiny_base):
    """The base model without the LoRA, LCM 2 steps, seed 318, PROMPT (what --lora_scale 0 must give)."""
    pipe = yi.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    yi.set_scheduler(pipe, "lcm")
    image = yi.generate(pipe, PROMPT, "lcm", generator=torch.Generator().manual_seed(318))[0]
    return pixels(image)


def pixels(image_or_path):
    image = image_or_path if isinstance(image_or_path, Image.Image) else Image.open(image_or_path)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def run_cli(argv, capsys=None):
    paths = inference_examples.main([str(a) for a in argv])
    if capsys is not None:
        printed = capsys.readouterr().out.split()
        assert printed == [str(p) for p in paths], "the script prints the paths it wrote"
    return paths


def cli_error(argv, capsys):
    """Run the script on bad input: exit status 2 and exactly one ``error:`` line, no traceback."""
    with pytest.raises(SystemExit) as exc:
        inference_examples.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("inference_examples.py: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the base model is loaded (errors that must come before it)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the bad input was reported")

    monkeypatch.setattr(yi, "load_pipeline", refuse)


def lora_only_copy(lora_dir, dest):
    """A LoRA folder without latent statistics."""
    dest.mkdir()
    (dest / LORA_WEIGHT_NAME).write_bytes((Path(lora_dir) / LORA_WEIGHT_NAME).read_bytes())
    return dest


# --------------------------------------------------------------------------------------------------
# The latent statistics file


def test_latent_stats_round_trip_and_format(tmp_path):
    from safetensors.torch import load_file

    mean = torch.randn(4, 8, 8)
    path = ls.save_latent_stats(tmp_path / "sub" / LATENT_STATS_NAME, mean, torch.tensor(0.75), 12)
    raw = load_file(str(path))
    assert set(raw) == {"mean", "std", "count"}
    assert raw["mean"].dtype == torch.float32 and raw["mean"].shape == (4, 8, 8)
    assert raw["std"].dtype == torch.float32 and raw["std"].shape == ()
    assert raw["count"].dtype == torch.int64 and raw["count"].shape == () and raw["count"].item() == 12
    loaded_mean, loaded_std = ls.load_latent_stats(path)
    assert torch.equal(loaded_mean, mean) and loaded_std.item() == pytest.approx(0.75)
    # A plain float std works too, and nothing but the file is left behind (temp file + os.replace).
    ls.save_latent_stats(path, mean, 0.5, 3)
    assert ls.load_latent_stats(path)[1].item() == pytest.approx(0.5)
    assert sorted(p.name for p in path.parent.iterdir()) == [LATENT_STATS_NAME]
    with pytest.raises(ValueError):
        ls.save_latent_stats(path, torch.randn(8, 8), 0.5, 3)
    with pytest.raises(ValueError):
        ls.save_latent_stats(path, mean, torch.ones(2), 3)


def test_load_latent_stats_rejects_bad_files(tmp_path, lora_dir):
    from safetensors.torch import save_file

    with pytest.raises(ls.LatentStatsError, match="does not exist"):
        ls.load_latent_stats(tmp_path / "missing.safetensors")
    with pytest.raises(ls.LatentStatsError, match="not a latent statistics file"):
        ls.load_latent_stats(Path(lora_dir) / LORA_WEIGHT_NAME)
    save_file({"mean": torch.zeros(4, 8, 8), "std": torch.tensor(0.0)}, str(tmp_path / "zero_std.safetensors"))
    with pytest.raises(ls.LatentStatsError, match="std"):
        ls.load_latent_stats(tmp_path / "zero_std.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ls.LatentStatsError, match="not a readable safetensors"):
        ls.load_latent_stats(tmp_path / "junk.safetensors")


def test_compute_latent_stats():
    latents = torch.randn(10, 4, 8, 8) * 2 + torch.arange(4.0).view(1, 4, 1, 1)
    mean, std = ls.compute_latent_stats(latents)
    assert mean.shape == (4, 8, 8)
    assert torch.allclose(mean, latents.mean(0))
    assert std.item() == pytest.approx((latents - latents.mean(0)).pow(2).mean().sqrt().item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Schedulers and the informative prior


def test_schedulers_per_mode(tiny_base):
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, LCMScheduler

    pipe = DiffusionPipeline.from_pretrained(tiny_base)
    for mode, steps, timesteps in [("lcm", 2, [999, 499]), ("dpm", 2, [999, 499]), ("one_step_ipi", 1, [999]), ("one_step", 1, [999])]:
        scheduler = yi.make_scheduler(pipe, mode)
        assert isinstance(scheduler, DPMSolverMultistepScheduler if mode == "dpm" else LCMScheduler)
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == timesteps, mode
        assert scheduler.init_noise_sigma == 1.0
    # Why dpm forces trailing spacing: this config (like any saved by recent diffusers) says "leading",
    # and from_config alone would start 2 steps at t = 667 from pure noise.
    plain = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    plain.set_timesteps(2)
    assert plain.timesteps[0] < 999
    assert yi.DEFAULT_GUIDANCE == {"lcm": 1.5, "dpm": 1.5, "one_step_ipi": 1.5, "one_step": 1.0}


def test_ipi_latents_formula_and_init_noise_sigma():
    from diffusers import LCMScheduler

    from yoso.testing import SD15_SCHEDULER_CONFIG

    scheduler = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    mean, std = torch.randn(4, 8, 8), torch.tensor(0.7)
    x_t = yi.ipi_latents(scheduler, mean, std, 3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    first, second = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    a_bar = scheduler.alphas_cumprod[999]
    expected = a_bar.sqrt() * (mean + std * first) + (1 - a_bar).sqrt() * second
    assert torch.allclose(x_t, expected, atol=1e-6)

    class ScaledScheduler:  # a scheduler whose pipeline would multiply the latents by 4
        init_noise_sigma = 4.0

        def add_noise(self, x, noise, t):
            assert t.tolist() == [999]
            return x + noise

    x_t = yi.ipi_latents(ScaledScheduler(), mean, std, 3, torch.Generator().manual_seed(5))
    assert torch.allclose(x_t * 4.0, mean + std * first + second, atol=1e-6)


def test_ipi_latents_are_what_reaches_the_unet(tiny_base, lora_dir):
    pipe = yi.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    yi.set_scheduler(pipe, "one_step_ipi")
    yi.load_lora(pipe, yi.resolve_lora(str(lora_dir)))
    mean, std = ls.load_latent_stats(Path(lora_dir) / LATENT_STATS_NAME)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args[0].clone(), int(args[1]))), with_kwargs=True)
    images = yi.generate(pipe, PROMPT, "one_step_ipi", generator=torch.Generator().manual_seed(7),
                         num_images_per_prompt=2, latent_stats=(mean, std))
    assert len(images) == 2 and images[0].size == (SIZE, SIZE)
    assert len(seen) == 1, "one UNet call"
    sample, timestep = seen[0]
    assert timestep == 999
    gen = torch.Generator().manual_seed(7)
    first, second = torch.randn(2, *mean.shape, generator=gen), torch.randn(2, *mean.shape, generator=gen)
    a_bar = pipe.scheduler.alphas_cumprod[999]
    expected = a_bar.sqrt() * (mean + std * first) + (1 - a_bar).sqrt() * second
    # Classifier-free guidance (1.5) runs the unconditional and conditional halves on the same latents.
    assert sample.shape == (4, *mean.shape)
    assert torch.allclose(sample[:2], expected, atol=1e-5) and torch.allclose(sample[2:], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The command line: every mode, files and sizes


@pytest.mark.parametrize("mode", ["lcm", "dpm", "one_step_ipi", "one_step"])
def test_every_mode_writes_images_and_grid(mode, tiny_base, lora_dir, tmp_path, capsys):
    out = tmp_path / "out"
    paths = run_cli(["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--mode", mode, "--prompt", PROMPT,
                     "--num_images_per_prompt", 2, "--device", "cpu", "--output_dir", out], capsys)
    names = [p.name for p in paths]
    assert names == ["000_00_a-photo-of-a-man-xt3.png", "000_01_a-photo-of-a-man-xt3.png", "grid.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for path in paths[:-1]:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
            assert f'"mode": "{mode}"' in image.text["parameters"]
    with Image.open(paths[-1]) as grid:
        assert grid.size == (2 * SIZE, SIZE)
    # Each image of a prompt comes from its own noise; the images are not constant.
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))
    assert pixels(paths[0]).std() > 1


def test_prompt_file_gives_a_grid_row_per_prompt(tiny_base, lora_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red fox\n\nA photo of a man, XT3\n", encoding="utf-8")
    paths = run_cli(["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--prompt_file", prompt_file, "--device", "cpu",
                     "--output_dir", tmp_path / "out"], capsys)
    assert [p.name for p in paths] == ["000_00_a-red-fox.png", "001_00_a-photo-of-a-man-xt3.png", "grid.png"]
    grid = pixels(paths[-1])
    assert grid.shape == (2 * SIZE, SIZE, 3)
    assert np.array_equal(grid[:SIZE], pixels(paths[0])) and np.array_equal(grid[SIZE:], pixels(paths[1]))


def test_lora_changes_the_output_and_lora_scale_zero_is_the_base(tiny_base, lora_dir, base_only_image, tmp_path):
    common = ["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--mode", "lcm", "--seed", 318, "--prompt", PROMPT, "--device", "cpu"]
    with_lora = pixels(run_cli(common + ["--output_dir", tmp_path / "lora"])[0])
    assert np.abs(with_lora - base_only_image).mean() > 5, "the LoRA changes the image"
    scale_zero = pixels(run_cli(common + ["--lora_scale", 0, "--output_dir", tmp_path / "zero"])[0])
    assert np.abs(scale_zero - base_only_image).max() <= 1


def test_fuse_lora_gives_the_unfused_image(tiny_base, lora_dir, base_only_image, tmp_path):
    common = ["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--mode", "lcm", "--seed", 318, "--device", "cpu", "--lora_scale", 0.6]
    # The unfused run has PROMPT second in a list, the fused one alone: each prompt gets its own generator
    # seeded with --seed, so a prompt's image does not depend on the prompts before it.
    unfused = pixels(run_cli(common + ["--prompt", "a red fox", PROMPT, "--output_dir", tmp_path / "unfused"])[1])
    fused = pixels(run_cli(common + ["--prompt", PROMPT, "--fuse_lora", "--output_dir", tmp_path / "fused"])[0])
    assert np.abs(fused - unfused).max() <= 1  # fp32 CPU: the float images differ by ~1e-6
    assert np.abs(fused - base_only_image).mean() > 2, "the fused LoRA is active"


def test_fused_pipeline_matches_unfused_in_float(tiny_base, lora_dir):
    images = {}
    for fuse in (False, True):
        pipe = yi.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
        yi.set_scheduler(pipe, "lcm")
        yi.load_lora(pipe, yi.resolve_lora(str(lora_dir)), lora_scale=0.6, fuse=fuse)
        images[fuse] = yi.generate(pipe, PROMPT, "lcm", generator=torch.Generator().manual_seed(1), output_type="np")
    assert np.abs(images[True] - images[False]).max() < 1e-4


# --------------------------------------------------------------------------------------------------
# The informative prior from the command line


def test_one_step_ipi_reads_the_stats(tiny_base, lora_dir, tmp_path):
    common = ["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--mode", "one_step_ipi", "--prompt", PROMPT, "--device", "cpu"]
    beside = run_cli(common + ["--output_dir", tmp_path / "beside"])[0]
    with Image.open(beside) as image:
        assert str(Path(lora_dir) / LATENT_STATS_NAME) in image.text["parameters"]
    mean, std = ls.load_latent_stats(Path(lora_dir) / LATENT_STATS_NAME)
    other = ls.save_latent_stats(tmp_path / "other.safetensors", mean + 3.0, std * 0.1, 8)
    explicit = run_cli(common + ["--latent_stats", other, "--output_dir", tmp_path / "explicit"])[0]
    assert np.abs(pixels(explicit) - pixels(beside)).mean() > 2, "other statistics, another image"
    plain = run_cli(["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--mode", "one_step", "--prompt", PROMPT,
                     "--device", "cpu", "--output_dir", tmp_path / "plain"])[0]
    assert not np.array_equal(pixels(plain), pixels(beside))


def test_one_step_ipi_without_stats_says_how_to_get_them(lora_dir, tiny_base, tmp_path, capsys, no_model_loading):
    bare = lora_only_copy(lora_dir, tmp_path / "bare")
    line = cli_error(["--pretrained_model_name_or_path", tiny_base, "--lora", bare, "--mode", "one_step_ipi", "--output_dir", tmp_path / "o"], capsys)
    assert LATENT_STATS_NAME in line and "train_yoso_lora.py" in line
    assert "--latent_stats" in line and "--ipi_from_samples" in line
    line = cli_error(["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--mode", "one_step_ipi",
                      "--latent_stats", tmp_path / "nope.safetensors"], capsys)
    assert "nope.safetensors: no such file" in line


def test_ipi_from_samples_computes_and_saves_stats(lora_dir, tiny_base, tmp_path, capsys):
    bare = lora_only_copy(lora_dir, tmp_path / "bare")
    out = tmp_path / "out"
    paths = run_cli(["--pretrained_model_name_or_path", tiny_base, "--lora", bare, "--mode", "one_step_ipi", "--ipi_from_samples", 3,
                     "--prompt", PROMPT, "--device", "cpu", "--output_dir", out], capsys)
    assert [p.name for p in paths] == ["000_00_a-photo-of-a-man-xt3.png", "grid.png"]
    stats = out / LATENT_STATS_NAME
    mean, std = ls.load_latent_stats(stats)
    assert mean.shape == (4, SIZE // 8, SIZE // 8) and std.item() > 0
    from safetensors.torch import load_file

    assert load_file(str(stats))["count"].item() == 3
    with Image.open(paths[0]) as image:
        assert str(stats) in image.text["parameters"]


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def test_bad_lora_paths_fail_before_loading_the_model(tiny_base, lora_dir, tmp_path, capsys, no_model_loading):
    def error(lora, *extra):
        return cli_error(["--pretrained_model_name_or_path", tiny_base, "--lora", lora, *extra], capsys)

    assert "no such file or folder" in error(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.safetensors").write_bytes((Path(lora_dir) / LORA_WEIGHT_NAME).read_bytes())
    assert f"folder has no {LORA_WEIGHT_NAME} (it has other.safetensors" in error(empty)
    text_file = tmp_path / "lora.bin"
    text_file.write_text("hello")
    assert "is not a .safetensors file" in error(text_file)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert "is not a readable safetensors file" in error(junk)
    full_unet = Path(tiny_base) / "unet" / "diffusion_pytorch_model.safetensors"
    assert "holds no LoRA tensors" in error(full_unet)
    assert "no such folder" in cli_error(["--pretrained_model_name_or_path", tmp_path / "no_base", "--lora", lora_dir], capsys)
    assert "not a diffusers pipeline folder" in cli_error(["--pretrained_model_name_or_path", tmp_path, "--lora", lora_dir], capsys)
    assert "takes one step" in error(lora_dir, "--mode", "one_step", "--steps", 2)
    assert "are for --mode one_step_ipi" in error(lora_dir, "--ipi_from_samples", 4)
    assert "not overwritten" in error(lora_dir, "--mode", "one_step_ipi", "--ipi_from_samples", 4, "--output_dir", lora_dir)
    assert "invalid choice" in error(lora_dir, "--mode", "three_step")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "cannot be created" in error(lora_dir, "--output_dir", a_file / "out")
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "could not be read as UTF-8" in error(lora_dir, "--prompt_file", binary)


def test_lora_that_does_not_fit_the_base_model(tiny_teacher, tiny_base, lora_dir, tmp_path, capsys):
    # The SD-Turbo-shaped teacher: other text width and linear projections, so the LoRA's shapes differ.
    line = cli_error(["--pretrained_model_name_or_path", tiny_teacher, "--lora", lora_dir, "--device", "cpu", "--output_dir", tmp_path / "o"], capsys)
    assert line.startswith(f"inference_examples.py: error: --lora {lora_dir} does not fit --pretrained_model_name_or_path {tiny_teacher}: size mismatch")
    # LoRA keys for modules this UNet does not have (diffusers would only warn and drop them).
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = Path(lora_dir) / LORA_WEIGHT_NAME
    state = load_file(str(source))
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    extra = {k.replace("unet.down_blocks.0.", "unet.down_blocks.5."): v.clone() for k, v in state.items() if k.startswith("unet.down_blocks.0.")}
    bigger = tmp_path / "bigger.safetensors"
    save_file({**state, **extra}, str(bigger), metadata=metadata)
    line = cli_error(["--pretrained_model_name_or_path", tiny_base, "--lora", bigger, "--device", "cpu", "--output_dir", tmp_path / "o"], capsys)
    assert "does not fit" in line and "are not in the UNet, e.g. down_blocks.5." in line


def test_unavailable_hub_lora_is_one_line(tiny_base, tmp_path, capsys):
    line = cli_error(["--pretrained_model_name_or_path", tiny_base, "--lora", "nobody-here/no-such-lora", "--device", "cpu",
                      "--output_dir", tmp_path / "o"], capsys)
    assert line.startswith("inference_examples.py: error: could not load --lora nobody-here/no-such-lora (not a local file or folder, tried as a hub id)")


@pytest.mark.parametrize("failure", ["misfit_lora", "hub_lora_unavailable"])
def test_error_after_the_pipeline_loads_leaves_no_output_dir(failure, tiny_base, tiny_teacher, lora_dir, tmp_path, capsys):
    # Both errors come after load_pipeline: the output folder (and its missing parents) must not be created
    # before there is something to write into it (issue 12.10).
    base, lora = (tiny_teacher, lora_dir) if failure == "misfit_lora" else (tiny_base, "nobody-here/no-such-lora")
    out = tmp_path / "not_yet" / "out"
    line = cli_error(["--pretrained_model_name_or_path", base, "--lora", lora, "--device", "cpu", "--output_dir", out], capsys)
    assert ("does not fit" if failure == "misfit_lora" else "could not load --lora") in line
    assert not out.exists() and not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_script_error_is_one_line_on_stderr(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "inference_examples.py", "--lora", str(tmp_path / "missing")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"inference_examples.py: error: --lora {tmp_path / 'missing'}: no such file or folder (and not a hub id of the form owner/name)"]


# --------------------------------------------------------------------------------------------------
# docs/inference.md's usage section: every snippet runs against the tiny models


BASE_IDS = ("stablediffusionapi/realistic-vision-v51", "runwayml/stable-diffusion-v1-5")
LORA_IDS = ("Luo-Yihong/yoso_sd1.5_lora", "yoso-lora-output")
DEVICE_CHOICE = ('device = "cuda" if torch.cuda.is_available() else "cpu"\n'
                 'dtype = torch.float16 if device == "cuda" else torch.float32')

# The python snippets in page order: a text each must contain, and the command-line arguments that
# must give the same image.
PY_SNIPPETS = [
    ("LCMScheduler", ["--mode", "lcm", "--seed", "318", "--prompt", "A photo of a man, XT3"]),
    ("DPMSolverMultistepScheduler", ["--mode", "dpm", "--seed", "323", "--prompt", "A photo of a girl, XT3"]),
    ("fuse_lora()", ["--mode", "lcm", "--fuse_lora", "--seed", "0", "--prompt", "A photo of a cat"]),
    ("add_noise", ["--mode", "one_step_ipi", "--seed", "318", "--prompt", "A photo of a man, XT3"]),
]


def usage_section():
    text = (REPO / "docs" / "inference.md").read_text(encoding="utf-8")
    start, end = text.index("<!-- usage:start -->"), text.index("<!-- usage:end -->")
    assert start < end
    return text[start:end]


def readme_blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", usage_section(), flags=re.S | re.M)


def readme_commands():
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(line.strip())
    return commands


def localize_python(code, base, lora):
    """Swap the hub ids for tiny local folders, nothing else: the snippet picks its device and dtype itself
    (CUDA in float16 when there is one, else the CPU in float32), so it runs as written on the CPU. Asserts
    that the block contained each id, so an edit of the page cannot make this test skip a block."""
    assert DEVICE_CHOICE in code and code.count("from_pretrained(") == 1 and "dtype=dtype).to(device)" in code
    swaps = {**{i: ("base", str(base)) for i in BASE_IDS}, **{i: ("lora", str(lora)) for i in LORA_IDS}}
    replaced = {"base": 0, "lora": 0}

    def swap(match):
        name, new = swaps[match.group(0)]
        replaced[name] += 1
        return new

    # One pass, so that a replacement is never itself rewritten.
    code = re.sub("|".join(re.escape(old) for old in swaps), swap, code)
    assert all(replaced.values()), f"a usage snippet lacks one of the swapped parts: {replaced}"
    # Nothing else names a device or a dtype: the snippet's choice is used throughout.
    assert code.count('"cuda"') == 2 and code.count("float16") == 1
    return code


def test_readme_has_the_usage_snippets():
    blocks = readme_blocks("python")
    assert len(blocks) == len(PY_SNIPPETS)
    for block, (marker, cli) in zip(blocks, PY_SNIPPETS):
        assert marker in block
        assert f'"{cli[cli.index("--prompt") + 1]}"' in block and f"manual_seed({cli[cli.index('--seed') + 1]})" in block
        assert "load_lora_weights(" in block, "every snippet loads the LoRA"
    assert "from_config(pipeline.scheduler.config" in blocks[1] and "from_pretrained(\"runwayml" not in blocks[1]
    assert len(readme_commands()) == 4


@pytest.mark.parametrize("index", range(len(PY_SNIPPETS)))
def test_readme_python_snippet_runs_and_matches_the_script(index, tiny_base, lora_dir, tmp_path):
    code = localize_python(readme_blocks("python")[index], tiny_base, lora_dir)
    namespace = {"__name__": "readme_snippet"}
    exec(compile(code, f"docs/inference.md usage snippet {index + 1}", "exec"), namespace)
    image = namespace["imgs"][0]
    assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE)
    device = namespace["device"]
    assert namespace["dtype"] == (torch.float16 if device == "cuda" else torch.float32)
    if not torch.cuda.is_available():
        assert device == "cpu" and namespace["pipeline"].unet.dtype == torch.float32
    cli = run_cli(["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--device", device, "--output_dir", tmp_path / "cli",
                   *PY_SNIPPETS[index][1]])
    assert np.abs(pixels(cli[0]) - pixels(image)).max() <= 1, "the script gives the snippet's image"


@pytest.mark.parametrize("index", range(4))
def test_readme_command_runs(index, tiny_base, lora_dir, tmp_path, capsys):
    argv = shlex.split(readme_commands()[index])
    assert argv[:2] == ["python", "inference_examples.py"]
    argv = argv[2:]
    assert "--lora" in argv and argv[argv.index("--lora") + 1] in LORA_IDS
    argv[argv.index("--lora") + 1] = str(lora_dir)
    if "--pretrained_model_name_or_path" in argv:
        assert argv[argv.index("--pretrained_model_name_or_path") + 1] in BASE_IDS
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tiny_base)
    else:  # the default, realistic-vision-v51
        argv += ["--pretrained_model_name_or_path", str(tiny_base)]
    assert "--output_dir" in argv
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    paths = run_cli(argv + ["--device", "cpu"], capsys)
    assert paths[-1].name == "grid.png" and len(paths) >= 2
    for path in paths[:-1]:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)


# --------------------------------------------------------------------------------------------------
# The README's one snippet: run as written (only the hub ids swapped), on the device it picks


def readme_snippet():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, "the README shows one inference snippet"
    return blocks[0]


def test_readme_snippet_runs_as_written_and_matches_the_script(tiny_base, lora_dir, tmp_path, monkeypatch):
    code = readme_snippet()
    # Device and dtype as users expect: CUDA in float16 when there is one, else the CPU in float32.
    assert 'torch.cuda.is_available() else "cpu"' in code and "torch.float16 if" in code and "torch.float32" in code
    swaps = {'"stablediffusionapi/realistic-vision-v51"': repr(str(tiny_base)),
             '"Luo-Yihong/yoso_sd1.5_lora"': repr(str(lora_dir))}
    for old, new in swaps.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md inference snippet", "exec"), namespace)
    device = namespace["device"]
    assert namespace["dtype"] == (torch.float16 if device == "cuda" else torch.float32)
    if not torch.cuda.is_available():
        assert device == "cpu" and namespace["pipeline"].unet.dtype == torch.float32
    saved = Image.open(tmp_path / "man.png")
    assert saved.size == (SIZE, SIZE) and np.array_equal(pixels(saved), pixels(namespace["image"]))
    # The first docs/inference.md snippet's settings: the script gives the same image on the same device.
    cli = run_cli(["--pretrained_model_name_or_path", tiny_base, "--lora", lora_dir, "--device", device, "--output_dir", tmp_path / "cli",
                   *PY_SNIPPETS[0][1]])
    assert np.abs(pixels(cli[0]) - pixels(saved)).max() <= 1, "the script gives the snippet's image"


def test_default_hub_model_offline_is_one_line_without_hub_notices(tmp_path):
    """Offline, with the default hub ids and an empty cache: the one-line error alone, not diffusers'
    two-line "Couldn't connect to the Hub ... Will try to load from local cache." before it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "inference_examples.py"), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("inference_examples.py: error: could not load --pretrained_model_name_or_path stablediffusionapi/realistic-vision-v51")
    assert not (tmp_path / "out").exists()
