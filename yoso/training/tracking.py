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

    def means(self, step_values=None):
        """The window's means, averaged over processes; ``step_values`` (name -> device tensor or None, taken
        once per optimizer step, e.g. gradient norms) are averaged over processes only (None -> 0). One gather
        and one host read for all of them."""
        names = list(self.sums)
        step_values = {k: v for k, v in (step_values or {}).items()}
        device = self.accelerator.device
        values = [self.sums[k] / self.micro_steps for k in names]
        values += [torch.zeros((), device=device) if v is None else torch.as_tensor(v, device=device).float().reshape(())
                   for v in step_values.values()]
        world = self.accelerator.num_processes
        gathered = self.accelerator.gather(torch.stack([v.float().reshape(()) for v in values])).view(world, -1).mean(0)
        self.sums = {}
        return dict(zip(names + list(step_values), gathered.tolist()))
