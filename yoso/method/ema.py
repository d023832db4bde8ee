"""Exponential moving average of the LoRA tensors, kept in fp32 and updated in place.

    ema = decay_k * ema + (1 - decay_k) * lora     after the k-th optimizer step (k = 1, 2, ...; not micro-steps)

decay_k = ``decay`` (the released behaviour), or with ``warmup`` (diffusers' EMAModel ``use_ema_warmup``):
decay_k = min(decay, 1 - (1 + (k - 1) / inv_gamma) ** -power), so the first update copies the LoRA (decay 0)
and the average lengthens as training goes. k is counted by ``num_updates``, which checkpoints hold, so a
resumed run continues the same sequence.
"""

import torch


class LoRAEMA:
    def __init__(self, named_parameters, decay=0.999, warmup=False, inv_gamma=1.0, power=2 / 3):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {decay}")
        if inv_gamma <= 0 or power <= 0:
            raise ValueError(f"--ema_inv_gamma and --ema_power must be > 0, got {inv_gamma} and {power}")
        self.decay = decay
        self.warmup, self.inv_gamma, self.power = bool(warmup), float(inv_gamma), float(power)
        self.last_decay = None
        self.names = [name for name, _ in named_parameters]
        self.parameters = [p for _, p in named_parameters]
        self.shadow = [p.detach().float().clone() for p in self.parameters]
        self.num_updates = 0

    def decay_at(self, k):
        """The decay of the k-th update (k >= 1)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + (k - 1) / self.inv_gamma) ** -self.power)

    @torch.no_grad()
    def update(self):
        decay = self.decay_at(self.num_updates + 1)
        # lerp_(p, w) is ema + w * (p - ema) = (1 - w) * ema + w * p, in place, no temporary copies of the set.
        current = [p.detach().float() for p in self.parameters]
        torch._foreach_lerp_(self.shadow, current, 1.0 - decay)
        self.num_updates += 1
        self.last_decay = decay

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
