"""Training a model for `prob_map.py --method dense`: the dense-consistency loss.

`dense` gives each lattice point the pooled feature-map cells under its crop, computed
over a whole slide tile, where `lattice` runs the crop on its own (zero padding at its
edges). A model trained on crops alone never learnt to make the two agree, and they do
not (docs/speed.md: Pearson r 0.77-0.84 on the demo models). The fix belongs to training: with config
`dense_consistency` > 0, each grid image also goes through the backbone whole (its
crops' corners on the feature grid, as `dense` places its tiles), every cell's window
gives a dense logit and feature, and the loss adds

    dense_consistency * (mean squared logit difference + mean (1 - cosine) of the features)

against the crops' own logits and features. Both sides get gradients: the model moves
towards outputs that do not depend on how the slide was cut.

Batch norm is frozen (running statistics, as at inference), so the loss is meant for
fine-tuning a trained model (`init_from`). With batch statistics the two passes normalise
by different batches in training, unlike at inference, and in a trial on the demo the
agreement learnt carried over to inference clearly less well.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .dense import feature_side, feature_stride
from .model import CRFNet


def check_geometry(model: CRFNet, patch: int) -> str | None:
    """None when crops of `patch`-pixel cells fall on the feature grid, else why not."""
    stride = feature_stride(model)
    if patch % stride:
        return (f"dense_consistency needs patch_size to be a multiple of the feature stride {stride} "
                f"(got {patch}), as --method dense does")
    return None


class DenseConsistent(nn.Module):
    """Wraps a grid-mode `CRFNet` for training: `forward((cells, context))` returns the
    model's usual output on the cells and the dense-consistency gap (a scalar). Its
    batch norms stay in eval mode."""

    def __init__(self, model: CRFNet, patch: int, crop: int) -> None:
        super().__init__()
        self.model = model
        self.window = feature_side(model, crop)
        self.step = patch // feature_stride(model)  # feature cells from one cell's crop to the next

    def train(self, mode: bool = True) -> "DenseConsistent":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cells, context = batch
        b, n = cells.shape[:2]
        logits, feats = self.model.embed(cells.flatten(0, 1))
        out = self.model.join(logits, feats, b, n)
        dense_logits, dense_feats = self.dense(context, round(n ** 0.5))
        gap = F.mse_loss(dense_logits.float(), logits.float()) + \
            (1 - F.cosine_similarity(dense_feats.float(), feats.float(), dim=1)).mean()
        return out, gap

    def dense(self, context: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B * grid^2]` and features `[B * grid^2, D]` of each cell's window in
        the whole image's feature map, row-major like the cells."""
        fmap = self.model.features(context)
        pooled = F.avg_pool2d(fmap, self.window, stride=1)
        at = torch.arange(grid, device=fmap.device) * self.step
        feats = pooled[:, :, at][:, :, :, at].permute(0, 2, 3, 1).flatten(0, 2)
        return self.model.fc(feats).squeeze(1), feats
