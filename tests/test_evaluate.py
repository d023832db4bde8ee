"""evaluate_yoso.py, yoso/evaluation/runs.py and yoso/evaluation/metrics.py on the tiny SD1.5-shaped pipeline.

The metric networks are tiny local stand-ins passed through the same flags as the real ones: a TorchScript
FID feature network with the Inception module's call signature, and a tiny CLIP model trained here for a
few seconds on coloured squares, so that its CLIP score is informative (a random CLIP's is not). Every
metric the script reports is checked against a straight-line numpy/scipy computation from the image files.
"""

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import evaluate_yoso
import inference_examples
from yoso.evaluation import runs as ev
from yoso.evaluation import metrics as im
from yoso.evaluation import inference as yi
from yoso.data.latent_stats import LATENT_STATS_NAME, save_latent_stats

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # the tiny pipeline's resolution
NUM_PROMPTS = 6
SEED = 11


# --------------------------------------------------------------------------------------------------
# Stand-ins for the metric networks


class ColorTextureFeatures(torch.nn.Module):
    """FID features that respond to colour, contrast and noise: per-channel mean and std, mean gradients.
    Called like NVlabs' Inception TorchScript: ``net(uint8 images, return_features=True)``."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.float() / 255.0
        grad_x = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
        grad_y = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), grad_x[:, None], grad_y[:, None]], dim=1)
        return 100 * features  # FIDs of order 1-100, like Inception's


COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220),
          "yellow": (235, 220, 40), "white": (240, 240, 240), "black": (15, 15, 15)}


def color_square(rgb, rng, size=40):
    pixels = np.asarray(rgb, dtype=np.float64) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def caption(name):
    return f"a photo of a {name} square"


@pytest.fixture(scope="module")
def fid_net(tmp_path_factory):
    import warnings

    path = tmp_path_factory.mktemp("fid") / "color_texture.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: the format of the real Inception file
        torch.jit.script(ColorTextureFeatures()).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (SD1.5's tokenizer) trained contrastively on coloured squares and their captions."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from yoso.testing import make_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=make_clip_tokenizer())
    rng = np.random.default_rng(0)
    names = list(COLORS)
    tokens = processor.tokenizer([caption(n) for n in names], padding=True, return_tensors="pt")
    batches = [processor.image_processor(images=[color_square(COLORS[n], rng) for n in names], return_tensors="pt")["pixel_values"]
               for _ in range(8)]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):  # the contrastive loss falls from 2.6 to about 0.01
        loss = model(**tokens, pixel_values=batches[step % len(batches)], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def straight_clip_scores(folder, paths, captions):
    """100 * max(cos, 0) per image via CLIPModel.forward's normalized embeddings (another code path)."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)(list(captions), padding=True, truncation=True, max_length=77, return_tensors="pt")
    images = [Image.open(p).convert("RGB") for p in paths]
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels)
    cosine = (out.image_embeds.double() * out.text_embeds.double()).sum(-1).numpy()
    return 100 * np.maximum(cosine, 0)


def straight_clean_pixels(path, size):
    """clean-fid's clean resize written out: no crop; per channel a float32 mode-F PIL image, bicubic, clip."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return np.stack([np.clip(np.asarray(Image.fromarray(rgb[..., k].astype(np.float32), mode="F")
                                        .resize((size, size), Image.BICUBIC)), 0, 255) for k in range(3)], axis=-1)


def straight_fid(net_path, real_paths, fake_paths, size=299, protocol="crop_uint8"):
    """FID from features of the files (center crop, PIL bicubic to 299; or clean-fid's clean resize), numpy
    covariances, scipy sqrtm."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(net_path))

    def features(paths):
        arrays = []
        for p in paths:
            if protocol == "clean":
                arrays.append(straight_clean_pixels(p, size).astype(np.float32))
                continue
            image = Image.open(p).convert("RGB")
            w, h = image.size
            s = min(w, h)
            image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(image))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return net(x, return_features=True).double().numpy()

    real, fake = features(real_paths), features(fake_paths)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def assert_close(a, b, rel=1e-4):
    assert abs(a - b) <= rel * max(1.0, abs(b)), (a, b)


# --------------------------------------------------------------------------------------------------
# Inputs: LoRAs, a COCO-shaped annotation file and its images


def make_quick_lora(base, folder, seed):
    """A LoRA with nonzero weights on the tiny base UNet, and latent statistics beside it."""
    from diffusers import UNet2DConditionModel

    from yoso.method.lora import add_lora, lora_named_parameters, save_lora

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    add_lora(unet, rank=4, alpha=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in lora_named_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_lora(unet, folder)
    save_latent_stats(Path(folder) / LATENT_STATS_NAME, torch.randn(4, SIZE // 8, SIZE // 8, generator=generator) * 0.5, 0.8, 16)
    return Path(folder)


def synthetic_photo(rng, size=(80, 64)):
    """A stand-in for a photo (not square, to exercise the center crop): a colour gradient and ellipses."""
    w, h = size
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    image = Image.fromarray(np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        draw.ellipse((x, y, x + int(rng.integers(6, 30)), y + int(rng.integers(6, 30))), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def lora_dir(tiny_base, tmp_path_factory):
    return make_quick_lora(tiny_base, tmp_path_factory.mktemp("lora") / "yoso-lora-output", seed=1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """(captions.json, image folder): 10 COCO-named images with 3 captions each, annotation ids shuffled."""
    root = tmp_path_factory.mktemp("coco")
    images_dir = root / "val2014"
    images_dir.mkdir()
    rng = np.random.default_rng(3)
    images, annotations = [], []
    words = list(COLORS)
    for image_id in range(1, 11):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        synthetic_photo(rng).save(images_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": 80, "height": 64})
        for j in range(3):
            annotations.append({"image_id": image_id, "id": 1000 - 10 * image_id - j,
                                "caption": f" A {words[(image_id + j) % len(words)]} thing, photo {image_id}.{j}\n"})
    rng.shuffle(annotations)
    path = root / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}), encoding="utf-8")
    return path, images_dir


def base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, output_dir, *extra, replace_lora=None):
    loras = replace_lora or [lora_dir]
    return ["--pretrained_model_name_or_path", tiny_base, "--lora", *loras, "--prompts", coco[0], "--num_prompts", NUM_PROMPTS,
            "--prompt_seed", 5, "--reference_dir", coco[1], "--reference_images", "matched", "--seed", SEED,
            "--fid_feature_net", fid_net, "--clip_model", tiny_clip, "--device", "cpu", "--batch_size", 4,
            "--output_dir", output_dir, *extra]


def run_main(argv):
    return evaluate_yoso.main([str(a) for a in argv])


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("evaluate_yoso.py: error: "), err
    assert "Traceback" not in err
    return lines[0]


def pixels(path_or_image):
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


ALL_MODES = ["lcm:1,2", "dpm", "one_step_ipi", "one_step"]
RUN_DIRS = ["lcm-1step", "lcm-2step", "dpm-2step", "one_step_ipi-1step", "one_step-1step"]


@pytest.fixture(scope="module")
def evaluated(tiny_base, lora_dir, coco, fid_net, tiny_clip, tmp_path_factory):
    """One in-process evaluation: one LoRA, every mode, 6 COCO prompts, matched reference images."""
    out = tmp_path_factory.mktemp("eval") / "out"
    report = run_main(base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", *ALL_MODES))
    return out, report


# --------------------------------------------------------------------------------------------------
# Prompt sources, modes, names


def test_coco_prompts_are_a_seeded_draw_of_distinct_images(coco):
    path, _ = coco
    data = json.loads(path.read_text())
    captions = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].split()))
    files = {i["file_name"]: i["id"] for i in data["images"]}
    drawn = ev.read_prompts(path, 5, prompt_seed=4)
    assert len(drawn) == 5 and len({p["image_file"] for p in drawn}) == 5
    for p in drawn:
        assert p["prompt"] in captions[files[p["image_file"]]], "the caption belongs to its image, whitespace normalized"
    assert [files[p["image_file"]] for p in drawn] == sorted(files[p["image_file"]] for p in drawn), "image id order"
    assert ev.read_prompts(path, 5, prompt_seed=4) == drawn
    assert {p["image_file"] for p in ev.read_prompts(path, 5, prompt_seed=5)} != {p["image_file"] for p in drawn}
    everything = ev.read_prompts(path)
    assert len(everything) == 10 and sorted(p["image_file"] for p in everything) == sorted(files)
    with pytest.raises(ev.EvaluationError, match="more than the 10 captioned images"):
        ev.read_prompts(path, 11)


def test_text_and_jsonl_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n  two  words \nthree\nfour\n", encoding="utf-8")
    assert [p["prompt"] for p in ev.read_prompts(txt)] == ["one", "two words", "three", "four"]
    drawn = [p["prompt"] for p in ev.read_prompts(txt, 2, prompt_seed=1)]
    assert len(drawn) == 2 and drawn == [p for p in ["one", "two words", "three", "four"] if p in drawn], "file order kept"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"caption": "b"}\n"c"\n{"text": "d", "x": 1}\n', encoding="utf-8")
    assert [p["prompt"] for p in ev.read_prompts(jsonl)] == ["a", "b", "c", "d"]
    assert all(p["image_file"] is None for p in ev.read_prompts(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"url": "x"}\n', encoding="utf-8")
    with pytest.raises(ev.EvaluationError, match="line 2 has no 'prompt'"):
        ev.read_prompts(bad)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "id": 1, "caption": "x"}]}))
    with pytest.raises(ev.EvaluationError, match="image_id 2"):
        ev.read_prompts(orphan)
    with pytest.raises(ev.EvaluationError, match="expected a COCO captions .json"):
        (tmp_path / "p.csv").write_text("a")
        ev.read_prompts(tmp_path / "p.csv")


def test_modes_grammar():
    assert ev.parse_modes(["lcm"]) == [("lcm", 2)]
    assert ev.parse_modes(["lcm", "dpm", "one_step_ipi"], steps=[1, 4]) == [("lcm", 1), ("lcm", 4), ("dpm", 1), ("dpm", 4), ("one_step_ipi", 1)]
    assert ev.parse_modes(["lcm:1,2,4", "dpm:2", "one_step", "one_step_ipi:1", "lcm:2"]) == \
        [("lcm", 1), ("lcm", 2), ("lcm", 4), ("dpm", 2), ("one_step", 1), ("one_step_ipi", 1)]
    for tokens, steps, message in [(["lcm:x"], None, "integers"), (["three_step"], None, "unknown mode"),
                                   (["one_step:2"], None, "takes one step"), (["lcm:0"], None, ">= 1"),
                                   (["lcm:2", "one_step"], [4], "--steps applies")]:
        with pytest.raises(ev.EvaluationError, match=message):
            ev.parse_modes(tokens, steps)


def test_lora_names_are_unique():
    assert ev.lora_names(["runs/a/yoso-lora-output", "runs/b/yoso-lora-output", "x/model.safetensors", "owner/yoso_sd1.5_lora"]) == \
        ["yoso-lora-output", "b-yoso-lora-output", "model", "yoso_sd1.5_lora"]
    assert ev.lora_names(["a/b", "a/b/"]) == ["b", "a-b"]
    assert ev.shard(7, 0, 2) == [0, 2, 4, 6] and ev.shard(7, 1, 2) == [1, 3, 5]


# --------------------------------------------------------------------------------------------------
# The metrics against straight-line computations, and their direction


def test_fid_matches_scipy_and_grows_with_noise_and_blur(fid_net, tmp_path):
    rng = np.random.default_rng(0)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for i in range(20):
        synthetic_photo(rng).save(real_dir / f"{i:03d}.png")
    real = im.list_images(real_dir)
    scorer = im.FIDScorer(fid_net, resolution=96, batch_size=16)  # 96 px: a faster test, the same code
    scorer.set_reference(real)

    def corrupted(kind, amount):
        folder = tmp_path / f"{kind}-{amount}"
        folder.mkdir()
        noise_rng = np.random.default_rng(1)
        for path in real:
            image = Image.open(path).convert("RGB")
            if kind == "noise":
                noisy = np.asarray(image, dtype=np.float64) + noise_rng.normal(0, amount, (image.height, image.width, 3))
                image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            else:
                image = image.filter(ImageFilter.GaussianBlur(amount))
            image.save(folder / path.name)
        return im.list_images(folder)

    assert abs(scorer.score(real)) < 1e-6, "the reference against itself"
    for kind, amounts in [("noise", [4, 16, 48]), ("blur", [0.7, 2, 5])]:
        fids = []
        for amount in amounts:
            fake = corrupted(kind, amount)
            fids.append(scorer.score(fake))
            assert_close(fids[-1], straight_fid(fid_net, real, fake, size=96))
        assert 0.01 < fids[0] < fids[1] < fids[2], (kind, fids)
    assert scorer.protocol()["num_reference_images"] == 20
    assert "96x96" in scorer.protocol()["preprocessing"] and "bicubic" in scorer.protocol()["preprocessing"]


def test_clip_score_matches_straight_line_and_prefers_true_captions(tiny_clip, tmp_path):
    rng = np.random.default_rng(7)
    names = list(COLORS) * 2
    paths = []
    for i, name in enumerate(names):
        color_square(COLORS[name], rng, size=48).save(tmp_path / f"{i:02d}.png")
        paths.append(tmp_path / f"{i:02d}.png")
    true = [caption(n) for n in names]
    shuffled = true[1:] + true[:1]  # every image gets another colour's caption
    scorer = im.CLIPScorer(tiny_clip, batch_size=5)
    for captions in (true, shuffled):
        np.testing.assert_allclose(scorer.scores(paths, captions), straight_clip_scores(tiny_clip, paths, captions), atol=1e-4)
    matched, mismatched = scorer.score(paths, true), scorer.score(paths, shuffled)
    assert matched > mismatched + 10, (matched, mismatched)
    protocol = scorer.protocol()
    assert "center crop 32x32" in protocol["preprocessing"] and "100 * max(cos" in protocol["definition"]


# --------------------------------------------------------------------------------------------------
# The command line, end to end


def test_evaluation_writes_images_and_reports(evaluated, coco, lora_dir):
    out, report = evaluated
    assert json.loads((out / ev.METRICS_JSON).read_text()) == json.loads(json.dumps(report))
    prompts = [json.loads(line) for line in (out / ev.PROMPTS_NAME).read_text().splitlines()]
    assert [p["index"] for p in prompts] == list(range(NUM_PROMPTS)) and [p["seed"] for p in prompts] == [SEED + k for k in range(NUM_PROMPTS)]
    assert prompts == [{"index": k, **p, "seed": SEED + k} for k, p in enumerate(ev.read_prompts(coco[0], NUM_PROMPTS, 5))]
    assert sorted(p.name for p in (out / "images" / "yoso-lora-output").iterdir()) == sorted(RUN_DIRS)
    for run_dir in RUN_DIRS:
        folder = out / "images" / "yoso-lora-output" / run_dir
        assert sorted(p.name for p in folder.iterdir()) == [f"{k:05d}.png" for k in range(NUM_PROMPTS)] + [ev.RUN_SETTINGS_NAME]
        settings = json.loads((folder / ev.RUN_SETTINGS_NAME).read_text())
        assert settings["mode"] == run_dir.rsplit("-", 1)[0] and settings["lora"] == str(lora_dir)
        for k in range(NUM_PROMPTS):
            with Image.open(folder / f"{k:05d}.png") as image:
                assert image.size == (SIZE, SIZE)
                meta = json.loads(image.text["parameters"])
                assert meta["prompt"] == prompts[k]["prompt"] and meta["seed"] == SEED + k and meta["index"] == k
    assert [(r["mode"], r["steps"], r["guidance_scale"]) for r in report["runs"]] == \
        [("lcm", 1, 1.5), ("lcm", 2, 1.5), ("dpm", 2, 1.5), ("one_step_ipi", 1, 1.5), ("one_step", 1, 1.0)]
    assert report["generation"]["image_size"] == [SIZE, SIZE] and report["generation"]["world_size"] == 1
    assert report["reference"]["images"] == "matched" and report["protocol"]["fid"]["num_reference_images"] == NUM_PROMPTS
    table = (out / ev.METRICS_MD).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| yoso-lora-output")]
    assert len(rows) == 5
    for row, run in zip(rows, report["runs"]):
        assert f"| {NUM_PROMPTS} vs {NUM_PROMPTS} | {run['fid']:.2f} | {run['clip_score']:.2f} |" in row
        assert run["fid_reference_images"] == NUM_PROMPTS
    assert "299x299" in table and "bicubic" in table
    with Image.open(out / ev.GRID_NAME) as grid:
        assert grid.size == (220 + NUM_PROMPTS * SIZE, 5 * SIZE)
        assert np.array_equal(np.asarray(grid)[:SIZE, 220:220 + SIZE], pixels(out / "images/yoso-lora-output/lcm-1step/00000.png"))
    # Different modes and step counts give different images from the same noise.
    firsts = [pixels(out / "images" / "yoso-lora-output" / d / "00000.png") for d in RUN_DIRS]
    assert all(not np.array_equal(firsts[0], other) for other in firsts[1:])


def test_reported_metrics_equal_straight_line_computations(evaluated, coco, fid_net, tiny_clip):
    out, report = evaluated
    prompts = [json.loads(line) for line in (out / ev.PROMPTS_NAME).read_text().splitlines()]
    reference = [coco[1] / p["image_file"] for p in prompts]
    for run in report["runs"]:
        paths = [out / run["images"] / f"{k:05d}.png" for k in range(NUM_PROMPTS)]
        assert_close(run["fid"], straight_fid(fid_net, reference, paths))
        assert_close(run["clip_score"], float(straight_clip_scores(tiny_clip, paths, [p["prompt"] for p in prompts]).mean()))


def test_one_step_ipi_images_are_those_of_inference_examples(evaluated, tiny_base, lora_dir, tmp_path):
    """Image k of a run is what inference_examples.py gives for prompt k with --seed SEED + k (the informative
    prior is drawn per image here, from each image's own generator; lcm: the two-LoRA test below)."""
    out, _ = evaluated
    prompts = [json.loads(line) for line in (out / ev.PROMPTS_NAME).read_text().splitlines()]
    k = 3
    mode, run_dir = "one_step_ipi", "one_step_ipi-1step"
    paths = inference_examples.main(["--pretrained_model_name_or_path", str(tiny_base), "--lora", str(lora_dir), "--mode", mode, "--seed", str(SEED + k),
                                     "--prompt", prompts[k]["prompt"], "--device", "cpu", "--output_dir", str(tmp_path / "ie")])
    assert np.abs(pixels(paths[0]) - pixels(out / "images" / "yoso-lora-output" / run_dir / f"{k:05d}.png")).max() <= 1


def test_two_loras_each_run_uses_its_own_lora_at_its_scale(tiny_base, lora_dir, coco, fid_net, tiny_clip, tmp_path):
    """Both LoRAs are loaded into one pipeline as separate adapters; each run must have only its own active."""
    other = make_quick_lora(tiny_base, tmp_path / "other" / "yoso-lora-output", seed=2)
    out = tmp_path / "out"
    argv = base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", "lcm:1", "--lora_scale", 0.7, replace_lora=[lora_dir, other])
    argv[argv.index("--num_prompts") + 1] = 3
    report = run_main(argv)
    assert [r["name"] for r in report["runs"]] == ["yoso-lora-output/lcm-1step", "other-yoso-lora-output/lcm-1step"]
    prompts = [json.loads(line) for line in (out / ev.PROMPTS_NAME).read_text().splitlines()]
    k = 1
    for lora, run in zip([lora_dir, other], report["runs"]):
        expected = inference_examples.main(["--pretrained_model_name_or_path", str(tiny_base), "--lora", str(lora), "--mode", "lcm", "--steps", "1",
                                            "--lora_scale", "0.7", "--seed", str(SEED + k), "--prompt", prompts[k]["prompt"],
                                            "--device", "cpu", "--output_dir", str(tmp_path / run["lora_name"])])[0]
        assert np.abs(pixels(expected) - pixels(out / run["images"] / f"{k:05d}.png")).max() <= 1
    first, second = (pixels(out / r["images"] / f"{k:05d}.png") for r in report["runs"])
    assert np.abs(first - second).mean() > 1, "the two LoRAs give different images"


def test_resume_makes_only_the_missing_images(evaluated, tiny_base, lora_dir, coco, fid_net, tiny_clip, tmp_path, monkeypatch):
    source, report = evaluated
    out = tmp_path / "out"
    shutil.copytree(source, out)
    run_dir = out / "images" / "yoso-lora-output" / "lcm-2step"
    removed = {k: pixels(run_dir / f"{k:05d}.png") for k in (1, 4)}
    for k in removed:
        (run_dir / f"{k:05d}.png").unlink()
    (out / ev.METRICS_JSON).unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    made = []
    original = ev.generate_batch

    def counting(pipe, mode, prompts, generators, *args, **kwargs):
        made.extend(prompts)
        return original(pipe, mode, prompts, generators, *args, **kwargs)

    monkeypatch.setattr(ev, "generate_batch", counting)
    argv = base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", "lcm:2")  # the run that lost images
    again = run_main(argv)
    prompts = [json.loads(line)["prompt"] for line in (out / ev.PROMPTS_NAME).read_text().splitlines()]
    assert made == [prompts[1], prompts[4]], "only the two missing images are generated, in one batch"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "images on disk are not rewritten"
    for k, before in removed.items():
        # Made in another batch than the first time (1 and 4 together): the same image, from its own seed.
        assert np.abs(pixels(run_dir / f"{k:05d}.png") - before).max() <= 1
    (new,) = again["runs"]
    old = report["runs"][1]
    assert new["name"] == old["name"] == "yoso-lora-output/lcm-2step"
    assert_close(new["fid"], old["fid"], 1e-5)
    assert_close(new["clip_score"], old["clip_score"], 1e-5)

    # Everything on disk: no model is loaded and no image made; the reports are written again.
    monkeypatch.setattr(yi, "load_pipeline", lambda *a, **k: pytest.fail("nothing to generate, yet the pipeline was loaded"))
    made.clear()
    (out / ev.METRICS_JSON).unlink()
    assert run_main(argv)["runs"] == again["runs"]
    assert made == [] and (out / ev.METRICS_JSON).is_file()


def test_resume_refuses_images_made_otherwise(evaluated, tiny_base, lora_dir, coco, fid_net, tiny_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(yi, "load_pipeline", lambda *a, **k: pytest.fail("the base model was loaded before the bad input was reported"))
    source, _ = evaluated
    out = tmp_path / "out"
    shutil.copytree(source, out)
    line = cli_error(base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", "lcm:2", "--guidance_scale", 2), capsys)
    assert "run.json: run yoso-lora-output/lcm-2step was made with other settings (guidance_scale: 1.5 there, 2.0 now)" in line
    argv = base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", "lcm:2")
    argv[argv.index("--seed") + 1] = SEED + 1
    assert "holds images of another prompt set" in cli_error(argv, capsys)


def test_two_processes_share_the_prompts_and_match_one_process(evaluated, tiny_base, lora_dir, coco, fid_net, tiny_clip, tmp_path):
    from harness import launch

    source, report = evaluated
    out = tmp_path / "out2"
    argv = base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", "lcm:1")
    argv[argv.index("--device") : argv.index("--device") + 2] = []  # each process's own device (the CPU here)
    result = launch([str(a) for a in argv], num_processes=2, script="evaluate_yoso.py", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((out / ev.METRICS_JSON).read_text())
    assert two["generation"]["world_size"] == 2
    one = {r["name"]: r for r in report["runs"]}
    for run in two["runs"]:
        assert_close(run["fid"], one[run["name"]]["fid"], 1e-5)
        assert_close(run["clip_score"], one[run["name"]]["clip_score"], 1e-5)
        ranks = {}
        for k in range(NUM_PROMPTS):
            with Image.open(out / run["images"] / f"{k:05d}.png") as image:
                ranks[k] = json.loads(image.text["parameters"])["rank"]
            assert np.abs(pixels(out / run["images"] / f"{k:05d}.png") - pixels(source / run["images"] / f"{k:05d}.png")).max() <= 1
        assert ranks == {k: k % 2 for k in range(NUM_PROMPTS)}, "process r makes images r, r + 2, ..."
    assert len(two["runs"]) == 1 and result.stdout.count("| yoso-lora-output |") == 1, "the main process alone reports"


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing loaded, nothing written


def test_bad_input_is_one_line_before_any_model(tiny_base, lora_dir, coco, fid_net, tiny_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(yi, "load_pipeline", lambda *a, **k: pytest.fail("the base model was loaded before the bad input was reported"))
    out = tmp_path / "out"

    def error(*extra, replace=None):
        argv = base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, *extra)
        for flag, value in (replace or {}).items():
            argv[argv.index(flag) + 1] = value
        return cli_error(argv, capsys)

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(lora_dir / "pytorch_lora_weights.safetensors", bare)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    prompts_txt = tmp_path / "p.txt"
    prompts_txt.write_text("".join(f"prompt {i}\n" for i in range(8)))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases = [
        (error(replace={"--prompts": tmp_path / "none.json"}), "--prompts"),
        (error("--modes", "lcm:2,x"), "--modes lcm:2,x"),
        (error("--modes", "one_step:2"), "takes one step"),
        (error(replace={"--num_prompts": 50}), "--num_prompts 50 is more than the 10"),
        (error(replace={"--num_prompts": 1}), "--num_prompts 1: out of range, use a value >= 2"),
        (error(replace={"--reference_dir": tmp_path / "nope"}), "--reference_dir"),
        (error(replace={"--prompts": prompts_txt}), "--reference_images matched needs COCO"),
        (error("--modes", "one_step_ipi", replace={"--lora": bare}), "latent_stats.safetensors"),
        (error("--latent_stats", "a", "b"), "one file per --lora"),
        (error("--latent_stats", lora_dir / LATENT_STATS_NAME), "--latent_stats is for --modes one_step_ipi"),
        (error(replace={"--lora": tmp_path / "missing"}), "--lora"),
        (error(replace={"--output_dir": a_file / "out"}), "--output_dir"),
        (error(replace={"--fid_feature_net": tmp_path / "none.pt"}), "--fid_feature_net"),
        (error(replace={"--fid_feature_net": a_file}), "not a loadable TorchScript"),
        (error(replace={"--clip_model": no_config}), "--clip_model"),
        (error(replace={"--batch_size": 0}), "--batch_size"),
        (error("--modes", "three_step"), "unknown mode"),
    ]
    for line, expected in cases:
        assert expected in line, line
    (coco[1] / "COCO_val2014_000000000004.jpg").rename(tmp_path / "moved.jpg")
    try:
        assert "are not in --reference_dir" in error(replace={"--num_prompts": 10})
    finally:
        (tmp_path / "moved.jpg").rename(coco[1] / "COCO_val2014_000000000004.jpg")
    assert not out.exists()


def test_lora_that_does_not_fit_leaves_no_output_dir(tiny_teacher, lora_dir, coco, fid_net, tiny_clip, tmp_path, capsys):
    # The SD-Turbo-shaped teacher has other attention widths: the LoRA's shapes do not fit its UNet.
    out = tmp_path / "new" / "out"
    line = cli_error(base_argv(tiny_teacher, lora_dir, coco, fid_net, tiny_clip, out), capsys)
    assert f"--lora {lora_dir} does not fit --pretrained_model_name_or_path {tiny_teacher}" in line
    assert not out.parent.exists()


# --------------------------------------------------------------------------------------------------
# docs/evaluation.md


def readme_evaluate_commands():
    text = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    start, end = text.index("<!-- evaluate:start -->"), text.index("<!-- evaluate:end -->")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text[start:end], flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if "evaluate_yoso.py" in line:
                commands.append(shlex.split(line.split("#")[0]))
    return commands


def test_readme_evaluate_commands_parse():
    commands = readme_evaluate_commands()
    assert len(commands) >= 2
    for argv in commands:
        argv = argv[argv.index("evaluate_yoso.py") + 1 :]
        args = evaluate_yoso.build_parser().parse_args(argv)
        assert ev.parse_modes(args.modes, args.steps)
        assert args.num_prompts == 5000 and args.prompts.endswith("captions_val2014.json")


# --------------------------------------------------------------------------------------------------
# --fid_protocol clean, and the reference set's size beside the score


def test_clean_protocol_is_clean_fids_float_resize_without_crop(fid_net, tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for i, size in enumerate([(80, 64), (64, 64), (50, 90)]):
        synthetic_photo(rng, size).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    clean = im.fid_input(paths[:1], 96, "clean")[0].permute(1, 2, 0).numpy()
    default = im.fid_input(paths[:1], 96)[0].permute(1, 2, 0).numpy().astype(np.float32)
    assert im.fid_input(paths[:1], 96, "clean").dtype == torch.float32 and im.fid_input(paths[:1], 96).dtype == torch.uint8
    assert np.array_equal(clean, straight_clean_pixels(paths[0], 96))
    assert (clean != np.round(clean)).mean() > 0.5  # not rounded to 8 bits
    # Non-square: the clean protocol squeezes the whole image (no crop), so the pictures differ ...
    assert np.abs(clean - default).mean() > 5
    # ... square: they differ only by the 8-bit rounding of the resize (PIL's 8-bit path rounds after each of
    # its two passes, in fixed point: within about one level).
    square_clean = im.fid_input(paths[1:2], 96, "clean")[0].numpy()
    square_default = im.fid_input(paths[1:2], 96)[0].numpy().astype(np.float32)
    assert 0 < np.abs(square_clean - square_default).max() <= 1.5
    assert 0.1 < np.abs(square_clean - square_default).mean() <= 0.5

    scorer = im.FIDScorer(fid_net, resolution=96, batch_size=2, protocol="clean")
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    real_dir.mkdir(), fake_dir.mkdir()
    for i in range(8):
        synthetic_photo(rng).save(real_dir / f"{i}.png")
        synthetic_photo(rng, (64, 80)).save(fake_dir / f"{i}.png")
    real, fake = im.list_images(real_dir), im.list_images(fake_dir)
    scorer.set_reference(real)
    fid_clean = scorer.score(fake)
    assert_close(fid_clean, straight_fid(fid_net, real, fake, size=96, protocol="clean"))
    fid_default = im.FIDScorer(fid_net, resolution=96, batch_size=2)
    fid_default.set_reference(real)
    assert abs(fid_default.score(fake) - fid_clean) > 0.1  # the protocols give other numbers on these images
    protocol = scorer.protocol()
    assert protocol["fid_protocol"] == "clean" and "no crop" in protocol["preprocessing"] and "mode F" in protocol["preprocessing"]
    with pytest.raises(im.MetricsError, match="--fid_protocol"):
        im.FIDScorer(fid_net, protocol="cleanfid")


def test_reference_images_all_states_the_reference_size_beside_the_score(evaluated, tiny_base, lora_dir, coco, fid_net,
                                                                         tiny_clip, tmp_path, monkeypatch):
    """The images of a finished evaluation scored again against the whole --reference_dir, clean protocol."""
    source, _ = evaluated
    out = tmp_path / "out"
    shutil.copytree(source, out)
    monkeypatch.setattr(yi, "load_pipeline", lambda *a, **k: pytest.fail("nothing to generate, yet the pipeline was loaded"))
    argv = base_argv(tiny_base, lora_dir, coco, fid_net, tiny_clip, out, "--modes", "lcm:1", "--fid_protocol", "clean")
    argv[argv.index("matched")] = "all"
    report = run_main(argv)
    reference = im.list_images(coco[1])
    assert len(reference) == 10 and report["protocol"]["fid"]["num_reference_images"] == 10
    (run,) = report["runs"]
    assert run["fid_reference_images"] == 10 and run["num_images"] == NUM_PROMPTS
    paths = [out / run["images"] / f"{k:05d}.png" for k in range(NUM_PROMPTS)]
    assert_close(run["fid"], straight_fid(fid_net, reference, paths, protocol="clean"))
    (row,) = [line for line in (out / ev.METRICS_MD).read_text().splitlines() if line.startswith("| yoso-lora-output")]
    assert f"| {NUM_PROMPTS} vs 10 | {run['fid']:.2f} |" in row
    assert report["protocol"]["fid"]["fid_protocol"] == "clean"
