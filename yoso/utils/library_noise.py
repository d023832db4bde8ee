"""Library notices that say nothing to a user of this project, filtered by their exact text.

Each is emitted by a library for a situation that is normal here:

- transformers, when diffusers looks up the image-processor classes a pipeline may hold: "`CLIPImageProcessor`
  requires torchvision (not installed); falling back to `CLIPImageProcessorPil`". This project does not use
  torchvision (it would pull another torch build), and the SD1.5 pipelines it loads hold no image processor
  that it runs.
- diffusers, when a scheduler is built from SD1.5's scheduler config (a PNDMScheduler's): "The config
  attributes {'skip_prk_steps': True} were passed to LCMScheduler, but are not expected and will be
  ignored". The attribute is PNDM's alone; every other unexpected attribute still warns.

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
