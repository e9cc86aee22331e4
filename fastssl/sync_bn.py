"""Global ("synchronised") BatchNorm across processes, on any device.

SimCLR (sec. 3, "Global BN") and MoCo v3 normalise with statistics of the whole global batch; otherwise each
device's BN can leak which samples share a device and the contrastive task gets a shortcut. On CUDA,
torch.nn.SyncBatchNorm does it with fused kernels; it refuses CPU tensors, so on CPU (the 2-process gloo tests
and CPU clusters) `GlobalBatchNorm` does the same maths with a differentiable all_reduce of the per-process
sums (and of the squared deviations). On one process both are plain BatchNorm.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastssl.losses.dist import rank_and_world

# torch.distributed.nn's all_reduce (the differentiable one GlobalBatchNorm needs) warns that it is deprecated on
# every call, on every rank; this one notice, and nothing else, is silenced once here, not on the hot path.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm over all processes' samples for 2-D (N, C) and 4-D (N, C, H, W) inputs, in training mode.

    Its all_reduce runs on a process group of its own: in backward it would otherwise interleave with DDP's
    asynchronous gradient buckets on the default group, and gloo pairs collectives by issue order, so two
    ranks could pair a BN reduction with a gradient bucket (seen with MoCo v3's two encoder calls).
    """

    group = None  # set by convert_global_bn on every rank

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2-D to 5-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or rank_and_world()[1] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training or not self.track_running_stats, self.momentum or 0.0, self.eps)
        from torch.distributed.nn.functional import all_reduce  # carries gradients back to every rank

        group = GlobalBatchNorm.group or dist.group.WORLD
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        local = torch.cat([xf.sum(dims), torch.tensor([x.numel() / c], device=x.device, dtype=torch.float32)])
        total = all_reduce(local, group=group)
        count = total[-1]
        mean = total[:c] / count
        # Two passes, not E[x^2] - mean^2 from one reduction: that difference cancels catastrophically in fp32
        # when a channel's mean is large against its spread (mean 1000, std 1: outputs off by 0.1; 3000: by
        # 1e3). One more all_reduce of C floats.
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=group) / count  # biased, as BN normalises with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in `module` by its global-batch version (no-op on one process)."""
    if rank_and_world()[1] == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if GlobalBatchNorm.group is None:
        GlobalBatchNorm.group = dist.new_group(backend="gloo")  # collective: every rank calls it here
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        # The same Parameter and buffer objects, as torch's convert_sync_batchnorm keeps them: a frozen BN
        # (the momentum encoder's) stays frozen, and an optimiser built before the conversion still holds them.
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
