"""The run around the step, as ``train_yoso_lora.py`` uses it.

- ``cli``         flags shared by the scripts, the valid range of every numeric flag; one-line argparse errors (exit 2)
- ``checks``      command-line validation that fails in one line before any model loads
- ``models``      loading and placing every model of a run
- ``builder``     settings (named like the flags) -> models, optimizers, lr schedule, EMA, the step
- ``checkpoint``  atomic checkpoint folders, ``latest``, pruning, the settings a resume must keep
- ``validation``  1-/2-step validation grids from the LoRA and its EMA
- ``tracking``    scalars averaged over accumulation and processes for the trackers
- ``interrupt``   Ctrl-C / SIGTERM stop at the end of an optimizer step; a full disk while saving in one line
"""
