"""The fast epoch: one MLP trained on one contiguous tensor with preallocated buffers.

    engine = Engine(model, features, targets, config, device="cpu")   # fused Adam built here
    mean_loss = engine.epoch(epoch)        # shuffle and dropout seeded from (seed, epoch) alone

Why it is fast (issue 17; at batch 64 the old loop was bound by per-step overhead, not
arithmetic): each epoch gathers the shuffled rows once into a preallocated copy, so a batch is a
view; the forward and backward passes of the Linear/ReLU/Dropout blocks are written out with
``out=`` buffers (no autograd graph, no per-step allocation); gradients live in preallocated
``.grad`` tensors that the fused Adam kernel reads (called directly: Optimizer.step's wrapper costs
several times the kernel at batch 64); the epoch's loss is computed once from the logits each
step wrote into an epoch-long buffer. The same arithmetic as autograd's (BCE-with-logits gradient
``sigmoid(z) - y`` over the batch mean, dropout masks ``bernoulli(1 - p) / (1 - p)``), so the loss
curve matches the old loop's to float rounding; bit-identical run to run on one machine with a
fixed thread count (deterministic algorithms on). torch.compile is not used: its first compile
costs more than a sample training, and its kernels are not promised deterministic across runs.

Start-up (issue 17: a sandbox child pays it on every run): torch.optim.Optimizer's methods are wrapped
so that torch.compile never traces them, and the wrapper imports torch._dynamo (with sympy, about as
long as torch itself) on its first call. Nothing here compiles, so :func:`skip_compiler_wrappers`
tells each wrapper its function is already excluded from compilation, before the first optimiser is
built, unless torch._dynamo is already imported (then someone may compile, and nothing is changed).
The arithmetic is untouched: the same functions run.
"""

from __future__ import annotations

import sys
from typing import Any

from secure_ml.training.config import TrainingConfig


def skip_compiler_wrappers() -> int:
    """Mark torch.optim.Optimizer's torch._disable_dynamo-wrapped methods as already excluded from
    torch.compile, so building and saving an optimiser never imports torch._dynamo; how many were marked."""
    if "torch._dynamo" in sys.modules:
        return 0
    import torch
    import torch._compile

    wrapper = torch._compile._disable_dynamo(lambda: None).__code__
    marked = 0
    for cls in (torch.optim.Optimizer, torch.optim.Adam):
        for member in vars(cls).values():
            inner = getattr(member, "__wrapped__", None)
            if inner is not None and getattr(member, "__code__", None) is wrapper:
                inner.__dynamo_disable = inner  # what the wrapper caches after its first call: call fn itself
                marked += 1
    return marked


class Engine:
    """Preallocated buffers and the hand-written passes for one model on one data tensor."""

    def __init__(self, model: Any, features: Any, targets: Any, config: TrainingConfig, *, device: str) -> None:
        import torch

        self.torch = torch
        self.config = config
        self.device = device
        self.features, self.targets = features, targets
        self.linears = [m for m in model.layers if isinstance(m, torch.nn.Linear)]
        params = [p for layer in self.linears for p in (layer.weight, layer.bias)]
        for p in params:
            p.grad = torch.zeros_like(p)  # written in place every step; never set to None
        self.optimiser = torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                          fused=True)
        n, width = features.shape
        batch = min(config.batch_size, max(n, 1))
        self.n, self.batch = n, batch
        self.rows = torch.empty((n, width), dtype=torch.float32, device=device)
        self.labels = torch.empty((n, 1), dtype=torch.float32, device=device)
        self.logits = torch.empty((n, 1), dtype=torch.float32, device=device)
        self.act = [torch.empty((batch, h), dtype=torch.float32, device=device) for h in config.hidden]
        self.mask = [torch.empty((batch, h), dtype=torch.float32, device=device) for h in config.hidden]
        self.alive = [torch.empty((batch, h), dtype=torch.bool, device=device) for h in config.hidden]
        self.delta = [torch.empty((batch, h), dtype=torch.float32, device=device) for h in config.hidden]
        self.out_grad = torch.empty((batch, 1), dtype=torch.float32, device=device)
        self.keep = 1.0 - config.dropout
        self.params = params
        # Optimizer.step's Python wrapper (hooks, profiler, group set-up) costs several times the fused
        # kernel at batch 64; the kernel Adam(fused=True) calls is called directly where torch has it,
        # on the state the optimiser owns (so state_dict, checkpoints and the chain see the same tensors).
        self._fused = getattr(torch, "_fused_adam_", None)

    def epoch(self, epoch: int) -> float:
        """Train one epoch; its mean training loss (float64 sum over the rows / rows)."""
        torch = self.torch
        config, n = self.config, self.n
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1009 + epoch)).to(self.device)
        torch.index_select(self.features, 0, order, out=self.rows)
        torch.index_select(self.targets, 0, order, out=self.labels.view(n))
        dropout = torch.Generator(device=self.device).manual_seed(config.seed + 1 + epoch)
        self._bind()
        with torch.no_grad():
            for first in range(0, n, self.batch):
                self._step(first, min(self.batch, n - first), dropout)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            self.logits.double(), self.labels.double(), reduction="sum")
        return float(loss.item()) / n

    def _step(self, first: int, size: int, dropout: Any) -> None:
        torch = self.torch
        full = size == self.batch
        last = first + size
        inputs = [self.rows[first:last]]
        drop = self.config.dropout > 0
        for i, layer in enumerate(self.linears[:-1]):
            act = self.act[i] if full else self.act[i][:size]
            torch.addmm(layer.bias, inputs[-1], layer.weight.t(), out=act)
            act.clamp_min_(0)
            if drop:
                mask = self.mask[i] if full else self.mask[i][:size]
                mask.bernoulli_(self.keep, generator=dropout)
                act.mul_(mask).div_(self.keep)
            inputs.append(act)
        head = self.linears[-1]
        logits = self.logits[first:last]
        torch.addmm(head.bias, inputs[-1], head.weight.t(), out=logits)
        grad = self.out_grad if full else self.out_grad[:size]
        # d(mean BCE-with-logits)/d logit = (sigmoid(logit) - label) / batch
        torch.sigmoid(logits, out=grad)
        grad.sub_(self.labels[first:last]).div_(size)
        for i in range(len(self.linears) - 1, -1, -1):
            layer = self.linears[i]
            torch.mm(grad.t(), inputs[i], out=layer.weight.grad)
            torch.sum(grad, 0, out=layer.bias.grad)
            if i:
                delta = self.delta[i - 1] if full else self.delta[i - 1][:size]
                alive = self.alive[i - 1] if full else self.alive[i - 1][:size]
                torch.mm(grad, layer.weight, out=delta)
                # ReLU then dropout: the gradient passes where the output is positive, scaled by 1/keep
                torch.gt(inputs[i], 0, out=alive)
                delta.mul_(alive)
                if drop:
                    delta.div_(self.keep)
                grad = delta
        if self._fused is None:
            self.optimiser.step()
            return
        torch._foreach_add_(self._steps, 1)
        self._fused(self.params, self._grads, self._exp_avgs, self._exp_avg_sqs, [], self._steps, amsgrad=False,
                    lr=self._group["lr"], beta1=self._group["betas"][0], beta2=self._group["betas"][1],
                    weight_decay=self._group["weight_decay"], eps=self._group["eps"], maximize=False,
                    grad_scale=None, found_inf=None)

    def _bind(self) -> None:
        """The optimiser's state tensors as the kernel's lists, created as Adam creates them when new
        (a fused Adam keeps ``step`` as a float32 tensor on the device); again after a state was loaded."""
        torch = self.torch
        self._group = self.optimiser.param_groups[0]
        states = [self.optimiser.state[p] for p in self.params]
        for p, state in zip(self.params, states, strict=True):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._grads = [p.grad for p in self.params]
        self._steps = [s["step"] for s in states]
        self._exp_avgs = [s["exp_avg"] for s in states]
        self._exp_avg_sqs = [s["exp_avg_sq"] for s in states]
