"""BatchNorm over the global batch on any device: the batch statistics are summed over the ranks.

A BatchNorm in training mode normalises with the statistics of the batch it sees. Under DDP each rank sees
its own part, so the result would change with the world size. ``SyncBatchNorm`` fixes that on GPUs only;
``GlobalBatchNorm`` all-reduces the per-channel sums (gradients included, through
``torch.distributed.nn``) on any backend, gloo on a CPU as well.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """``nn.BatchNorm*d`` whose training statistics are those of every rank's batch together."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() / channels, dtype=torch.float32)  # no host-to-device copy
        local = torch.cat([x.float().sum(dims), x.float().pow(2).sum(dims), count])
        total = dist_fn.all_reduce(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean.pow(2)).clamp_min(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def use_global_batchnorm(module: nn.Module) -> int:
    """Swap every BatchNorm under ``module`` for a ``GlobalBatchNorm`` sharing its parameters and buffers.

    Returns how many were swapped. Run it before the strategy wraps the model and before the optimizer is made.
    """
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            norm = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            norm.weight, norm.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(norm, buffer, getattr(child, buffer))
            norm.train(child.training)
            setattr(module, name, norm)
            swapped += 1
        else:
            swapped += use_global_batchnorm(child)
    return swapped
