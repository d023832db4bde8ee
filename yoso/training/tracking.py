"""The scalars a run logs: per-micro-step losses averaged over the accumulation window and over processes."""

import torch


class LossAverager:
    """Sums each logged scalar over an optimizer step's micro-steps; ``means()`` averages them over the
    window and over every process (one gather), then starts a new window."""

    def __init__(self, accelerator, gradient_accumulation_steps):
        self.accelerator = accelerator
        self.micro_steps = gradient_accumulation_steps
        self.sums = {}

    def add(self, logs):
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self):
        names = list(self.sums)
        world = self.accelerator.num_processes
        gathered = self.accelerator.gather(torch.stack([self.sums[k] for k in names])).view(world, -1).mean(0)
        self.sums = {}
        return {k: v.item() / self.micro_steps for k, v in zip(names, gathered)}
