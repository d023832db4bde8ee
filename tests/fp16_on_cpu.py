"""Run a script (default train_yoso_lora.py) with accelerate's GPU fp16 machinery emulated on CPU.

On CPU accelerate gives fp16 neither autocast nor a GradScaler, so train_yoso_lora.py refuses
``--mixed_precision fp16`` there. torch has both for CPU; this wrapper installs them into every
fp16 ``Accelerator`` (see ``harness.emulate_gpu_fp16``) and then runs the unmodified script, so the
tests exercise the fp16 path (fp16 frozen weights and autocast, two optimizers with their own
scalers, scaler state in checkpoints) without a GPU. Scaler settings: JSON in FP16_ON_CPU_SCALER.

    accelerate launch tests/fp16_on_cpu.py [train_yoso_lora.py] --mixed_precision fp16 ...
"""

import json
import os
import runpy
import sys
from pathlib import Path

import accelerate

from harness import REPO, emulate_gpu_fp16

scaler_kwargs = json.loads(os.environ.get("FP16_ON_CPU_SCALER", "{}"))
accelerator_init = accelerate.Accelerator.__init__


def init_with_emulated_fp16(self, *args, **kwargs):
    accelerator_init(self, *args, **kwargs)
    if self.mixed_precision == "fp16" and self.scaler is None:
        emulate_gpu_fp16(self, **scaler_kwargs)


accelerate.Accelerator.__init__ = init_with_emulated_fp16
script = REPO / "train_yoso_lora.py"
if len(sys.argv) > 1 and sys.argv[1].endswith(".py"):
    script = Path(sys.argv.pop(1))
sys.argv = [str(script)] + sys.argv[1:]
sys.path.insert(0, str(script.parent))
runpy.run_path(str(script), run_name="__main__")
