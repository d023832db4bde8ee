"""Models' configs read without their weights (a few KB, locally or from the Hub), with one-line errors
naming the flag: what the preflight checks and the teacher's latent plan are computed from."""

import functools
import os
import warnings
from pathlib import Path


class ArgumentError(ValueError):
    """A bad command-line value; the message is one line naming the flag."""


def _looks_local(path):
    # A hub id is "name" or "org/name"; anything else (absolute, relative with ./, deeper) is a folder.
    text = str(path)
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.path.sep != "/" and os.path.sep in text


def load_model_config(flag, path, subfolder, config_class, revision=None, cache_dir=None):
    """The config of ``path/subfolder`` (a local folder or a hub id), or an ArgumentError naming ``flag``.

    A hub id is read from the Hub cache first; only when it is not there is the Hub asked, and only when it
    answers at all (one quick request): the hub client's own retries take half a minute to fail offline."""
    if _looks_local(path) or os.path.exists(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ArgumentError(f"{flag} {path}: no such folder (give a diffusers model folder or a hub id)")
        if not (folder / subfolder / "config.json").is_file():
            raise ArgumentError(f"{flag} {path}: no {subfolder}/config.json there; is it a diffusers pipeline folder?")
        return _load_config(flag, path, subfolder, config_class, revision=revision, cache_dir=cache_dir)
    try:
        return _load_config(flag, path, subfolder, config_class, revision=revision, cache_dir=cache_dir,
                            local_files_only=True)
    except ArgumentError:
        pass  # not in the cache: ask the Hub below
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ArgumentError(f"{flag} {path}: not a local folder, and not in the Hub cache (offline mode: "
                            f"HF_HUB_OFFLINE=1); check the path, or download the model once with `hf download {path}`")
    unreachable = hub_unreachable()
    if unreachable:
        raise ArgumentError(f"{flag} {path}: not a local folder, and the Hub is unreachable ({unreachable}); check the "
                            "path, or the network (set HF_HUB_OFFLINE=1 to use only models already downloaded)")
    return _load_config(flag, path, subfolder, config_class, revision=revision, cache_dir=cache_dir)


def _load_config(flag, path, subfolder, config_class, **kwargs):
    try:
        with warnings.catch_warnings():  # hub-client deprecation chatter would bury the one-line error
            warnings.simplefilter("ignore")
            return config_class.load_config(str(path), subfolder=subfolder, **kwargs)
    except Exception as error:  # the hub client raises many types; all mean "cannot get it"
        raise ArgumentError(f"{flag} {path}: {_hub_failure(error, path, subfolder)}") from None


def _hub_failure(error, path, subfolder):
    """Why reading ``path/subfolder/config.json`` failed, in words: the hub client's error is often wrapped
    by diffusers in a generic one, so the chain is searched for the client's own types."""
    from huggingface_hub import errors

    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    kinds = [
        (errors.GatedRepoError, "gated on the Hub: accept its terms on huggingface.co, then `hf auth login`"),
        (errors.RepositoryNotFoundError, "not a local folder, and no such repository on the Hub (a private one needs "
                                         "`hf auth login`)"),
        (errors.RevisionNotFoundError, "no such --revision in the repository"),
        (errors.EntryNotFoundError, f"no {subfolder}/config.json in the repository; is it a diffusers pipeline?"),
    ]
    for kind, text in kinds:
        if any(isinstance(e, kind) for e in chain):
            return text
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot read {subfolder}/config.json locally or from the Hub ({reason})"


@functools.lru_cache(maxsize=None)
def hub_unreachable(timeout=5.0):
    """None when the Hub's endpoint answers one request (any status), else why not (one line). Through the
    hub client's own HTTP session, so proxies and ``HF_ENDPOINT`` apply."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # connection refused, no DNS, timeout, TLS: all mean "no Hub from here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{constants.ENDPOINT}: {reason}"
    return None


def vae_scale_factor(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def unet_downsampling(unet_config):
    return 2 ** (len(unet_config["down_block_types"]) - 1)


def check_resolution(resolution, base_vae, base_unet, which="the base model"):
    factor = vae_scale_factor(base_vae) * unet_downsampling(base_unet)
    if resolution <= 0 or resolution % factor:
        raise ArgumentError(
            f"--resolution {resolution}: {which} needs a multiple of {factor} "
            f"(VAE factor {vae_scale_factor(base_vae)} x UNet downsampling {unet_downsampling(base_unet)}), e.g. "
            f"{max(factor, round(resolution / factor) * factor)}"
        )
