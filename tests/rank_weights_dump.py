"""Run train_yoso_lora.py and then let every rank write the LoRA and D it holds (multi-process tests).

    accelerate launch tests/rank_weights_dump.py DUMP_DIR [training flags...]

Each rank writes DUMP_DIR/rank<i>.safetensors (``lora.<name>`` and ``d.<name>`` tensors) and
DUMP_DIR/rank<i>_indices.json (the prompt indices of every batch it trained on, in order), from the run
``train()`` returns, and DUMP_DIR/rank<i>_threads.json (the threads still alive then): the training script
itself carries no test hooks.
"""

import json
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_yoso_lora  # noqa: E402
from yoso.method.step import YOSOTrainingStep  # noqa: E402

dump = Path(sys.argv.pop(1))
seen_indices = []
inner_step = YOSOTrainingStep.step


def recording_step(self, batch, generator):
    seen_indices.append([int(i) for i in batch["indices"]])
    return inner_step(self, batch, generator)


def train_and_dump(*args, **kwargs):
    from safetensors.torch import save_file

    from yoso.method.lora import lora_named_parameters

    run = inner_train(*args, **kwargs)
    rank = run.accelerator.process_index
    tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in lora_named_parameters(run.unet_module)}
    tensors.update({f"d.{n}": p.detach().cpu().contiguous() for n, p in run.discriminator_module.state_dict().items()})
    dump.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dump / f"rank{rank}.safetensors"))
    (dump / f"rank{rank}_indices.json").write_text(json.dumps(seen_indices))
    (dump / f"rank{rank}_threads.json").write_text(json.dumps(sorted(t.name for t in threading.enumerate())))
    return run


YOSOTrainingStep.step = recording_step
inner_train = train_yoso_lora.train
train_yoso_lora.train = train_and_dump
train_yoso_lora.main(sys.argv[1:])
