"""The real data: scikit-learn's bundled handwritten digits, split, upscaled to 64x64 RGB, captioned.

``sklearn.datasets.load_digits`` holds 1,797 8x8 grey images (ink 0..16) of the digits 0-9, from the UCI
"Optical Recognition of Handwritten Digits" set; nobody in this project made them. Images are shown as dark
ink on white paper. Upscaling to 64x64 is bilinear; ``to_8x8`` brings any 64x64 image back to 8x8 (box
average of each 8x8 block, channel mean). Real and generated images go through the same ``to_8x8`` before
the classifier and the metrics, so they are compared in one domain.
"""

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption templates: {w} is the digit's word, {d} its numeral.
TEMPLATES = (
    "a handwritten digit {w}",
    "the number {d}",
    "a scanned handwritten {w}",
    "the digit {d}, written by hand",
    "a black and white image of the number {w}",
)

SPLIT_SEED = 0
TEST_FRACTION = 0.2
RESOLUTION = 64


def load_split(seed=SPLIT_SEED, test_fraction=TEST_FRACTION):
    """``(train_images, train_labels, test_images, test_labels)``: 8x8 float images in [0, 1] (1 = ink),
    split stratified by digit with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    return tr_x, tr_y, te_x, te_y


def upscale(images8, resolution=RESOLUTION):
    """8x8 ink images in [0, 1], shape [N, 8, 8] -> RGB tensors in [-1, 1], shape [N, 3, R, R], dark ink on white."""
    x = torch.as_tensor(np.asarray(images8), dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)
    paper = 1.0 - 2.0 * x  # ink 1 -> -1 (black), no ink 0 -> +1 (white)
    return paper.repeat(1, 3, 1, 1)


def to_8x8(images):
    """RGB images in [-1, 1], shape [N, 3, R, R] (tensor or array, R a multiple of 8) -> ink images in [0, 1],
    shape [N, 8, 8] as a float64 numpy array: channel mean, then the mean of each (R/8)x(R/8) block."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float()
    grey = x.clamp(-1, 1).mean(dim=1, keepdim=True)
    ink = (1.0 - grey) / 2.0
    k = ink.shape[-1] // 8
    return F.avg_pool2d(ink, k)[:, 0].double().numpy()


def caption(label, template_index):
    """Caption number ``template_index`` (mod the template count) for the digit ``label``."""
    template = TEMPLATES[template_index % len(TEMPLATES)]
    return template.format(w=DIGIT_WORDS[int(label)], d=int(label))


def captions_for(labels, seed=0):
    """One caption per label, templates drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(TEMPLATES), size=len(labels))
    return [caption(label, t) for label, t in zip(labels, picks)]


def eval_prompts(n_per_digit):
    """The evaluation's prompts: for each digit 0..9, ``n_per_digit`` prompts cycling through the templates.
    Returns ``(prompts, labels)`` in digit-major order."""
    prompts, labels = [], []
    for digit in range(10):
        for i in range(n_per_digit):
            prompts.append(caption(digit, i))
            labels.append(digit)
    return prompts, np.asarray(labels, dtype=np.int64)


def all_prompts():
    """Every (template, digit) caption: the prompt list YOSO-LoRA trains on."""
    return [caption(d, t) for t in range(len(TEMPLATES)) for d in range(10)]


def write_imagefolder(folder, seed=1):
    """The training split as a ``datasets`` imagefolder for ``train_yoso_lora.py --train_data_dir``: one 64x64
    RGB PNG per training image (``upscale``, rounded to 8 bits) and ``metadata.jsonl`` with the columns
    ``file_name`` and ``text``. Captions are ``captions_for(train_labels, seed)``, the same captions the teacher
    route's prompt file holds. The folder is built under a temporary name and renamed into place, so it is
    whole or absent. Returns the number of images."""
    import json
    import os
    import shutil
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    train_x, train_y, _, _ = load_split()
    texts = captions_for(train_y, seed=seed)
    pixels = ((upscale(train_x) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lines = []
        for i, (image, text) in enumerate(zip(pixels, texts)):
            name = f"{i:04d}_{int(train_y[i])}.png"
            Image.fromarray(image).save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": text}) + "\n")
        (tmp / "metadata.jsonl").write_text("".join(lines))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(lines)
