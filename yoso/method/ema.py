"""Exponential moving average of the LoRA tensors, kept in fp32 and updated in place.

    ema = decay * ema + (1 - decay) * lora     after every optimizer step (not every micro-step)
"""

import torch


class LoRAEMA:
    def __init__(self, named_parameters, decay=0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in named_parameters]
        self.parameters = [p for _, p in named_parameters]
        self.shadow = [p.detach().float().clone() for p in self.parameters]
        self.num_updates = 0

    @torch.no_grad()
    def update(self):
        # lerp_(p, w) is ema + w * (p - ema) = (1 - w) * ema + w * p, in place, no temporary copies of the set.
        current = [p.detach().float() for p in self.parameters]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        self.num_updates += 1

    def named_tensors(self):
        """Full parameter name -> EMA tensor, for exporting the EMA LoRA under the live LoRA's keys."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def swap(self):
        """Exchange the live LoRA weights and the EMA (call twice to undo); used for EMA validation images."""
        for p, s in zip(self.parameters, self.shadow):
            live = p.detach().clone()
            p.copy_(s)
            s.copy_(live)

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "names": list(self.names),
                "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state):
        if list(state["names"]) != self.names:
            raise ValueError("EMA checkpoint does not match this LoRA (different target modules or rank?)")
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for s, saved in zip(self.shadow, state["shadow"]):
                s.copy_(saved)
