"""What of a run's ``--output_dir`` goes to the Hugging Face Hub, under which names, and the upload.

Uploaded: the LoRAs (diffusers and, when written, kohya format; EMA and non-EMA), the model card
(README.md), ``latent_stats.safetensors`` and the validation grids. Never: checkpoints, tracker logs,
``*.incomplete`` folders, temporary files, or anything else: the list is an allow-list of known names.

One rename: on the Hub the non-EMA LoRA is ``pytorch_lora_weights_non_ema.safetensors`` at the top level,
not ``non_ema/pytorch_lora_weights.safetensors``. ``load_lora_weights(repo_id)`` without a
``weight_name`` takes any file whose path ends in ``pytorch_lora_weights.safetensors``, anywhere in the
repository, and warns and picks the first when there are several: the non-EMA file would compete with the
EMA one. Flat, distinct names also keep two downloaded kohya files from overwriting each other.
"""

from pathlib import Path

from yoso.method.lora import LORA_WEIGHT_NAME
from yoso.outputs.output_files import hub_files

class HubUploadError(ValueError):
    """An output folder that cannot be uploaded; the message is one line naming the folder."""


def default_repo_name(output_dir):
    """The repository name when ``--hub_model_id`` is not given (diffusers' examples: the folder's name)."""
    return Path(output_dir).resolve().name


def create_hub_repo(repo_id, *, token=None, private=None):
    """Create the model repository if it does not exist; returns its full id (``namespace/name``). Calling it
    when training starts (as diffusers' examples do) reports a missing login before hours of training."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def push_to_hub(output_dir, repo_id, *, token=None, private=None, commit_message="Upload YOSO-LoRA",
                args_dict=None, **card_kwargs):
    """Create (or reuse) the model repository ``repo_id`` and upload :func:`hub_files` in one commit.

    With ``args_dict`` (``vars(args)`` of train_yoso_lora.py) the model card is (re)written first, with the
    usage snippets pointing at the repository (``card_kwargs`` go to :func:`yoso.outputs.model_card.write_model_card`).
    Returns the commit's URL. Raises :class:`HubUploadError` before any network call if there is no LoRA.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    output_dir = Path(output_dir)
    if not (output_dir / LORA_WEIGHT_NAME).is_file():
        raise HubUploadError(f"{output_dir}: no {LORA_WEIGHT_NAME} to upload (train first, or give the run's --output_dir)")
    repo_id = create_hub_repo(repo_id, token=token, private=private)
    api = HfApi(token=token)
    if args_dict is not None:
        from yoso.outputs.model_card import write_model_card

        write_model_card(output_dir, args_dict, repo_id=repo_id, **card_kwargs)
    operations = [CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=str(output_dir / local))
                  for local, in_repo in hub_files(output_dir).items()]
    commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message)
    return commit.commit_url
