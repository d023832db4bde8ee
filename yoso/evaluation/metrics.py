"""FID and CLIP score of image files, each with its protocol written out as data for the reports.

FID (Frechet distance between Inception features of generated and reference images):

- the default protocol (``crop_uint8``): every image is read as RGB, center-cropped to a square and
  resized to 299 x 299 with PIL's bicubic filter on the 8-bit image (antialiased, unlike a tensor
  interpolation), so the resized pixels are rounded to uint8, then passed as uint8 to the feature network;
- ``clean`` (clean-fid's "clean" mode): no crop (the whole image is resized to 299 x 299); each channel is
  resized on its own as a float32 PIL image (mode ``F``), bicubic, clipped to [0, 255] and passed as
  float32, without rounding. The two differ in those two places only (for square images, in the rounding);
- the feature network is a TorchScript module called as ``net(images, return_features=True)`` -> ``[N, D]``.
  The default is NVlabs' TorchScript port of the TensorFlow Inception-v3 (2015-12-05 weights) that
  StyleGAN2-ADA and clean-fid use: pool3 features, 2048-d. Its own resize to 299 is the identity here;
- the statistics and the distance are torchmetrics' ``FrechetInceptionDistance`` (in float64) with that
  network as its ``feature=`` module. (torchmetrics' built-in Inception and clean-fid both import
  torchvision, which this project does not install.)

CLIP score, with a transformers ``CLIPModel`` (default ``openai/clip-vit-large-patch14``):

- images through ``CLIPImageProcessorPil`` (shorter side to 224 with PIL bicubic, center crop 224 x 224,
  CLIP's normalization), captions through the CLIP tokenizer truncated to its 77 tokens;
- per image ``100 * max(cos(image embedding, caption embedding), 0)``, averaged over the images.
  (torchmetrics' ``CLIPScore`` 1.9 expects ``get_image_features`` to return a tensor, which transformers 5
  no longer does, so the score is computed here with the same definition.)
"""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FID_RESOLUTION = 299
FID_INCEPTION_NAME = "inception-2015-12-05.pt"
FID_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MetricsError(ValueError):
    """A feature network, CLIP model or image that cannot be used; the message is one line."""


def _first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _field(sizes, key):
    """A field of an image processor's size settings (a dict, or transformers 5's SizeDict)."""
    return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)


def list_images(folder):
    """Image files directly in ``folder`` (by suffix), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def open_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:
        raise MetricsError(f"{path} is not a readable image: {_first_line(exc)}") from exc


def center_crop_resize(image, size):
    """The FID preprocessing: center crop to a square, PIL bicubic resize to ``size`` x ``size``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square if side == size else square.resize((size, size), Image.BICUBIC)


FID_PROTOCOLS = ("crop_uint8", "clean")
FID_PREPROCESSING = {
    "crop_uint8": "RGB, center crop to a square, PIL bicubic resize of the 8-bit image to {size}x{size}, uint8",
    "clean": ("RGB, no crop, each channel resized alone as a float32 PIL image (mode F), bicubic, to {size}x{size}, "
              "clipped to [0, 255], float32 (clean-fid's clean protocol)"),
}


def clean_resize(image, size):
    """clean-fid's "clean" resize: each channel of the 8-bit RGB image as a float32 PIL image (mode ``F``),
    bicubic to ``size`` x ``size`` (no crop), clipped to [0, 255]; float32 ``[size, size, 3]``, no rounding."""
    array = np.asarray(image, dtype=np.uint8)
    channels = []
    for k in range(3):
        channel = Image.fromarray(array[:, :, k].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
        channels.append(np.asarray(channel, dtype=np.float32).clip(0, 255))
    return np.stack(channels, axis=2)


def fid_input(paths, size=FID_RESOLUTION, protocol="crop_uint8"):
    """``[N, 3, size, size]`` tensor of the images at ``paths``, preprocessed for FID by ``protocol``
    (uint8 for ``crop_uint8``, float32 in [0, 255] for ``clean``)."""
    if protocol == "clean":
        arrays = [clean_resize(open_rgb(p), size) for p in paths]
    elif protocol == "crop_uint8":
        arrays = [np.asarray(center_crop_resize(open_rgb(p), size), dtype=np.uint8) for p in paths]
    else:
        raise MetricsError(f"--fid_protocol {protocol}: must be one of {FID_PROTOCOLS}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# The FID feature network


def default_inception_path():
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_NAME


def resolve_fid_feature_net(spec="auto"):
    """Path of the FID feature network: ``auto`` is NVlabs' Inception-v3 in torch's hub cache, downloaded
    there when missing; anything else must be a TorchScript file."""
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MetricsError(f"--fid_feature_net {spec}: no such file (a TorchScript feature network, or 'auto')")
        return path
    path = default_inception_path()
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_INCEPTION_URL, str(path), progress=True)  # writes a temp file, then renames
        except Exception as exc:
            raise MetricsError(f"could not download the FID Inception network from {FID_INCEPTION_URL} ({_first_line(exc)}): "
                               f"download it to {path} or pass --fid_feature_net PATH") from exc
    return path


class TorchScriptFeatures(torch.nn.Module):
    """A TorchScript feature network as a module for torchmetrics: ``forward(uint8 images) -> [N, D]``."""

    def __init__(self, path, num_features=None):
        super().__init__()
        try:
            with warnings.catch_warnings():
                # torch marks TorchScript deprecated; NVlabs' Inception exists only in that format.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise MetricsError(f"--fid_feature_net {path} is not a loadable TorchScript file: {_first_line(exc)}") from exc
        if num_features is None:
            with torch.inference_mode():
                num_features = int(self(torch.zeros(1, 3, FID_RESOLUTION, FID_RESOLUTION, dtype=torch.uint8)).shape[-1])
        self.num_features = num_features

    def forward(self, images):
        # float64 out: torchmetrics reports the distance in the features' dtype.
        return self.net(images, return_features=True).reshape(images.shape[0], -1).double()


class FIDScorer:
    """FID of image sets against one reference set; the reference statistics are computed once."""

    def __init__(self, feature_net_path, device="cpu", resolution=FID_RESOLUTION, batch_size=50, protocol="crop_uint8"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if protocol not in FID_PROTOCOLS:
            raise MetricsError(f"--fid_protocol {protocol}: must be one of {FID_PROTOCOLS}")
        self.fid_protocol = protocol
        self.path = Path(feature_net_path)
        self.resolution = resolution
        self.batch_size = batch_size
        self.device = torch.device(device)
        features = TorchScriptFeatures(self.path)
        # sync_on_compute=False: only the main process computes metrics, so there is nobody to sync with.
        self.metric = FrechetInceptionDistance(feature=features, reset_real_features=False, sync_on_compute=False)
        self.metric.set_dtype(torch.float64)
        self.metric.to(self.device)
        self.num_reference = 0

    def _update(self, paths, real, progress=None):
        for start in range(0, len(paths), self.batch_size):
            batch = fid_input(paths[start : start + self.batch_size], self.resolution, self.fid_protocol).to(self.device)
            with torch.inference_mode():
                self.metric.update(batch, real=real)
            if progress is not None:
                progress.update(len(batch))

    def set_reference(self, paths, progress=None):
        if len(paths) < 2:
            raise MetricsError(f"FID needs at least 2 reference images, got {len(paths)}")
        self._update(list(paths), True, progress)
        self.num_reference = len(paths)

    def score(self, paths, progress=None):
        if len(paths) < 2:
            raise MetricsError(f"FID needs at least 2 generated images, got {len(paths)}")
        self.metric.reset()  # the generated statistics only (reset_real_features=False)
        self._update(list(paths), False, progress)
        return float(self.metric.compute())

    def protocol(self):
        standard = self.path.name == FID_INCEPTION_NAME
        return {
            "feature_extractor": ("Inception-v3 pool3, 2048-d: TensorFlow 2015-12-05 weights, NVlabs' TorchScript port "
                                  f"({FID_INCEPTION_NAME}, as in StyleGAN2-ADA and clean-fid)") if standard
            else f"custom TorchScript feature network, {self.metric.inception.num_features}-d",
            "feature_net_file": str(self.path),
            "feature_net_sha256": sha256_file(self.path),
            "fid_protocol": self.fid_protocol,
            "preprocessing": FID_PREPROCESSING[self.fid_protocol].format(size=self.resolution),
            "implementation": "torchmetrics FrechetInceptionDistance (float64 statistics, unbiased covariances)",
            "num_reference_images": self.num_reference,
        }


# --------------------------------------------------------------------------------------------------
# CLIP score


def resolve_clip_model(spec=DEFAULT_CLIP_MODEL):
    """A local folder with the CLIP model's files: ``spec`` itself, or its hub snapshot (downloaded now, so
    that a missing model is reported before any image is generated)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MetricsError(f"--clip_model {spec}: folder has no config.json (a transformers CLIPModel folder is expected)")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as exc:
        raise MetricsError(f"could not get --clip_model {spec} (not a local folder, tried as a hub id): {_first_line(exc)}") from exc


class CLIPScorer:
    """CLIP score of images against their captions (see the module docstring for the definition)."""

    def __init__(self, model_path, device="cpu", batch_size=50, name=None):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        self.path = str(model_path)
        self.name = str(name or model_path)  # what the user asked for (a hub id), for the reports
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            self.model = CLIPModel.from_pretrained(self.path).eval().to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.image_processor = CLIPImageProcessorPil.from_pretrained(self.path)
        except Exception as exc:
            raise MetricsError(f"could not load the CLIP model from {self.path}: {_first_line(exc)}") from exc
        self.max_length = self.model.config.text_config.max_position_embeddings

    @staticmethod
    def _embedding(output):
        # transformers 5 returns the projected embedding as pooler_output; older versions a tensor.
        return output if torch.is_tensor(output) else output.pooler_output

    def scores(self, paths, captions, progress=None):
        """Per-image CLIP scores (a float64 numpy array)."""
        if len(paths) != len(captions):
            raise MetricsError(f"{len(paths)} images but {len(captions)} captions")
        out = []
        for start in range(0, len(paths), self.batch_size):
            images = [open_rgb(p) for p in paths[start : start + self.batch_size]]
            texts = list(captions[start : start + self.batch_size])
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                image_emb = self._embedding(self.model.get_image_features(pixel_values=pixels)).double()
                text_emb = self._embedding(self.model.get_text_features(**tokens)).double()
            cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
            out.append((100 * cosine.clamp(min=0)).cpu().numpy())
            if progress is not None:
                progress.update(len(images))
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, paths, captions, progress=None):
        return float(self.scores(paths, captions, progress).mean())

    def protocol(self):
        size = _field(self.image_processor.size, "shortest_edge")
        crop = {k: _field(self.image_processor.crop_size, k) for k in ("height", "width")}
        return {
            "model": self.name,
            "model_files": self.path,
            "preprocessing": (f"CLIPImageProcessorPil: shorter side to {size} (PIL bicubic), center crop "
                              f"{crop['height']}x{crop['width']}, CLIP normalization; captions truncated to {self.max_length} tokens"),
            "definition": "mean over images of 100 * max(cos(image embedding, caption embedding), 0)",
        }
