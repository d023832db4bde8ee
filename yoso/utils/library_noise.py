"""Library notices that say nothing to a user of this project, filtered by their exact text.

Each is emitted by a library for a situation that is normal here:

- transformers, when diffusers looks up the image-processor classes a pipeline may hold: "`CLIPImageProcessor`
  requires torchvision (not installed); falling back to `CLIPImageProcessorPil`". This project does not use
  torchvision (it would pull another torch build), and the SD1.5 pipelines it loads hold no image processor
  that it runs.
- diffusers, when a scheduler is built from SD1.5's scheduler config (a PNDMScheduler's): "The config
  attributes {'skip_prk_steps': True} were passed to LCMScheduler, but are not expected and will be
  ignored". The attribute is PNDM's alone; every other unexpected attribute still warns.
- diffusers, when a pipeline's hub id cannot be reached (offline, or no network): "Couldn't connect to the
  Hub: ... Will try to load from local cache." (two lines). Loading then either succeeds from the cache, or
  fails and our scripts say so in their one-line error, which names the model; the notice adds nothing.
- transformers, for every image-processor class it resolves, not only CLIP's (SigLIP's too, when
  ``convert_lora_to_kohya.py`` imports diffusers): the same "requires torchvision" notice.

Everything else the libraries log passes through unchanged.
"""

import logging
import re

# logger name -> patterns of the messages to drop (matched against the formatted message)
NOTICES = {
    "transformers.utils.import_utils": [re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to")],
    "diffusers.configuration_utils": [
        re.compile(r"^The config attributes \{'skip_prk_steps': (True|False)\} were passed to \w+Scheduler, but are not expected"),
    ],
    "diffusers.pipelines.pipeline_utils": [re.compile(r"^Couldn't connect to the Hub: .*\nWill try to load from local cache\.$", re.S)],
}


class _DropNotices(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = patterns

    def filter(self, record):
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def quiet_library_notices():
    """Install the filters (once per process; calling again changes nothing)."""
    for name, patterns in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(patterns))
