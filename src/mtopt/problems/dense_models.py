"""Dense-prediction models, tasks and metrics shared by Cityscapes and NYUv2 (Gama & Grassi's
configuration).

Encoder: ResNet-18 / ResNet-50 made *dilated* (output stride 8, as in DeepLab): the stride-2
convolutions of ``layer3`` and ``layer4`` get stride 1, and their 3×3 convolutions dilation 2 and
4. The first 3×3 convolution of each of those stages keeps the previous dilation (1 in
``layer3``, 2 in ``layer4``), as torchvision's ``replace_stride_with_dilation=[False, True,
True]`` and the CSAIL/MTAN ``_nostride_dilate`` (used by Gama & Grassi) both do. Parameter and
buffer names are those of torchvision's ``resnet18`` / ``resnet50`` (v1.5: the stride of a
bottleneck sits on its 3×3 convolution), so that ImageNet weights saved by torchvision load with
:func:`load_pretrained` (its ``fc`` layer is dropped). ``width`` scales every channel count
(64 = torchvision's network; 8 gives a tiny network for CPU tests and smoke runs, without
pretrained weights). ``dropout`` (``Dropout2d``) after the stem and after each stage is the
reference code's ``conv_p`` (0 there by default).

Heads (torchvision's DeepLab-v3 head with the reference's dropout): ASPP (1×1 conv, three 3×3
convs with dilation 12/24/36, image pooling; each ``channels`` wide + BN + ReLU), concatenation,
1×1 projection + BN + ReLU + dropout p; 3×3 conv + BN + ReLU; 1×1 conv to the outputs; bilinear
upsampling (``align_corners=True``, as the reference) to ``out_size`` (else ×8); then
log-softmax (segmentation), L2 normalisation (surface normals) or nothing.

Tasks and metrics. A batch holds each task's target under the task's name (and, for the
instance task, its validity mask under ``"<name>_valid"``). Losses are means over the *valid
pixels of the batch* (as in MTAN and Gama & Grassi). Every pixel metric is a
:class:`RatioMetric`: ``ratio(pred, batch)`` returns per-sample numerators and denominators of
shape ``(N, K)``:

* the **per-sample value** (what :class:`~mtopt.problems.base.Metric` needs, since dataset
  means are ``Σ batch_sum / len``) is the mean over the ``K`` entries with a positive
  denominator of ``num / den``; a sample without any valid pixel counts as 0 (no such sample
  exists in Cityscapes or NYUv2, except possibly an image without "thing" pixels for the
  instance task);
* the **pooled value** (:func:`evaluate_pooled`) sums numerators and denominators over the whole
  split first — the pixel-weighted means and the confusion-matrix mIoU of the reference code.

For scalar pixel metrics ``K = 1`` and ``num / den`` is the mean over the sample's valid pixels
(pixel accuracy, L1-abs, L1-rel, mean angle): the per-sample value weights images equally, the
pooled one weights pixels equally. For mIoU ``K`` is the number of classes, ``num`` the
intersection and ``den`` the union of each class over the sample's valid pixels; the per-sample
value is the mean IoU over the classes present in the prediction or the target of that image
(MTAN's ``compute_miou``), averaged over images. It is *not* the standard dataset-level mIoU
(one IoU per class over all pixels of the split, reported by :func:`evaluate_pooled`): it is
usually lower, because small classes that appear in an image are scored there even when rare in
the split. Model selection and Δm use the per-sample values against single-task references
measured the same way, so they are consistent; report :func:`evaluate_pooled` next to
published numbers.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtopt.problems import cache as cache_files
from mtopt.problems.base import Batch, Metric, MultiTaskModel, Problem, Split, TaskInput, TaskSpec

#: ImageNet mean and std (torchvision's pretrained models), RGB, for images in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -1
OUTPUT_STRIDE = 8
ASPP_RATES = (12, 24, 36)
#: ``width=8, head_channels=16``: a tiny model for CPU tests and smoke runs.
SMALL = {"width": 8, "head_channels": 16}

# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``; ``first_dilation`` for ``conv1``, ``dilation`` for
    ``conv2`` (they differ only in the first block of a dilated stage)."""

    expansion = 1

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.conv1 = _conv3x3(cin, planes, stride, first)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5: stride on the 3×3 conv); ``first_dilation`` is the
    3×3 conv's dilation in the first block of a dilated stage."""

    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        mid = dilation if first_dilation is None else first_dilation
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, mid)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


#: Block type and blocks per stage of each encoder.
ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "r18": (BasicBlock, (2, 2, 2, 2)),
    "r50": (Bottleneck, (3, 4, 6, 3)),
}
#: The dilation each stage ends with (output stride 8).
STAGE_DILATIONS = (1, 1, 2, 4)


class DilatedResNet(nn.Module):
    """Dilated ResNet-18/50 (output stride 8) with torchvision's parameter names, minus ``fc``.

    ``forward(x)`` returns the ``(N, out_channels, ⌈H/8⌉, ⌈W/8⌉)`` feature map."""

    def __init__(self, arch: str = "r18", width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown encoder {arch!r}; valid: {sorted(ARCHS)}")
        if width < 1:
            raise ValueError(f"width must be ≥ 1, got {width}")
        block, counts = ARCHS[arch]
        self.arch = arch
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        cin, dilation = width, 1
        for i, n in enumerate(counts):
            stride = 1 if i == 0 else 2
            new_dilation = STAGE_DILATIONS[i]
            if new_dilation > 1:  # replace the stride by dilation
                stride = 1
            stage, cin = _make_stage(block, cin, width * 2**i, n, stride, dilation, new_dilation)
            self.add_module(f"layer{i + 1}", stage)
            dilation = new_dilation
        self.out_channels = cin
        self.dropout = nn.Dropout2d(dropout)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.relu(self.bn1(self.conv1(x))))
        x = self.maxpool(x)
        for i in range(1, 5):
            x = self.dropout(getattr(self, f"layer{i}")(x))
        return x


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    cin: int,
    planes: int,
    n: int,
    stride: int,
    previous_dilation: int,
    dilation: int,
) -> tuple[nn.Sequential, int]:
    cout = planes * block.expansion
    down = _downsample(cin, cout, stride) if stride != 1 or cin != cout else None
    blocks = [block(cin, planes, stride, dilation, previous_dilation, down)]
    blocks += [block(cout, planes, 1, dilation) for _ in range(1, n)]
    return nn.Sequential(*blocks), cout


def _init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation (Kaiming normal, fan-out; BN weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def load_pretrained(
    encoder: DilatedResNet, path: str | Path, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load a torchvision ResNet state dict saved with ``torch.save`` (e.g. the
    ``resnet18-f37072fd.pth`` / ``resnet50-0676ba61.pth`` ImageNet files) into ``encoder``.

    Keys ``fc.*`` are dropped; a leading ``module.`` (DataParallel) is stripped. Dilation does
    not change any shape, so the dilated encoder takes the weights as they are. Returns the
    missing and unexpected keys (empty when ``strict``; else a mismatch raises)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = encoder.load_state_dict(state, strict=strict)
    return list(result.missing_keys), list(result.unexpected_keys)


#: Environment variables naming torchvision ImageNet weight files, used when ``pretrained`` is None.
PRETRAINED_ENV = {"r18": "MTOPT_RESNET18_WEIGHTS", "r50": "MTOPT_RESNET50_WEIGHTS"}


def resolve_pretrained(
    arch: str, pretrained: str | Path | bool | None, width: int = 64
) -> Path | None:
    """The weight file to load: ``pretrained`` itself; ``False``: none; ``None``: the file named
    by ``$MTOPT_RESNET18_WEIGHTS`` / ``$MTOPT_RESNET50_WEIGHTS`` if set and ``width`` is 64
    (torchvision's weights only fit the full-width network)."""
    if pretrained is False:
        return None
    if pretrained is None or pretrained is True:
        env = os.environ.get(PRETRAINED_ENV.get(arch, ""), "")
        if pretrained is True and not env:
            raise ValueError(f"pretrained=True needs ${PRETRAINED_ENV.get(arch)} to name a file")
        return Path(env) if env and width == 64 else None
    if width != 64:
        raise ValueError(f"ImageNet weights need width=64, got width={width}")
    return Path(pretrained)


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ASPPPooling(nn.Sequential):
    """Image-level features: global average pool, 1×1 conv + BN + ReLU, broadcast back.

    A training batch of one sample (e.g. a split's last batch) normalises with the running
    statistics: batch statistics of a single 1×1 value do not exist (torchvision's head raises
    there)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout))

    def forward(self, x: Tensor) -> Tensor:
        pool, conv, bn, relu = self
        y = conv(pool(x))
        if self.training and y.shape[0] == 1:
            assert isinstance(bn, nn.BatchNorm2d)
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        else:
            y = bn(y)
        return relu(y).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017, DeepLab-v3), dropout ``p`` at the end."""

    def __init__(
        self,
        cin: int,
        channels: int = 256,
        rates: Sequence[int] = ASPP_RATES,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        branches = [_conv_bn_relu(cin, channels)]
        branches += [_conv_bn_relu(cin, channels, 3, r) for r in rates]
        branches.append(ASPPPooling(cin, channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            *_conv_bn_relu(channels * len(branches), channels), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


OUTPUTS = ("log_softmax", "normalize", "none")


class DeepLabHead(nn.Module):
    """DeepLab-v3 head: ASPP, 3×3 conv + BN + ReLU, 1×1 conv to ``outputs`` channels, bilinear
    upsampling to ``out_size`` (``(H, W)``; ``None``: ×8), then ``output`` (see ``OUTPUTS``)."""

    def __init__(
        self,
        cin: int,
        outputs: int,
        channels: int = 256,
        dropout: float = 0.0,
        out_size: tuple[int, int] | None = None,
        output: str = "none",
        rates: Sequence[int] = ASPP_RATES,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.aspp = ASPP(cin, channels, rates, dropout)
        self.conv = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, outputs, 1)
        self.out_size = out_size
        self.output = output

    def forward(self, z: Tensor) -> Tensor:
        y = self.classifier(self.conv(self.aspp(z)))
        size = self.out_size or (z.shape[-2] * OUTPUT_STRIDE, z.shape[-1] * OUTPUT_STRIDE)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
        if self.output == "log_softmax":
            return F.log_softmax(y, dim=1)
        if self.output == "normalize":
            return F.normalize(y, dim=1)
        return y


def dense_model(
    heads: dict[str, tuple[int, str]],
    out_size: tuple[int, int],
    arch: str = "r18",
    width: int = 64,
    head_channels: int = 256,
    dropout: float = 0.0,
    encoder_dropout: float = 0.0,
    pretrained: str | Path | None = None,
) -> MultiTaskModel:
    """A dilated-ResNet encoder and one DeepLab head per task: ``heads`` maps a task name to
    ``(output channels, output kind)``; ``out_size`` is the input ``(H, W)``."""
    encoder = DilatedResNet(arch, width, encoder_dropout)
    if pretrained is not None:
        load_pretrained(encoder, pretrained)
    return MultiTaskModel(
        encoder,
        {
            name: DeepLabHead(encoder.out_channels, n, head_channels, dropout, out_size, kind)
            for name, (n, kind) in heads.items()
        },
    )


# --------------------------------------------------------------------------------------------
# Metrics: ratios of per-sample pixel sums
# --------------------------------------------------------------------------------------------

#: ``(pred, batch) -> (num, den)``, both ``(N, K)``.
Ratio = Callable[[Tensor, Batch], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class RatioMetric(Metric):
    """A :class:`Metric` defined by per-sample numerators and denominators (module docstring);
    ``batch_sum`` is derived from ``ratio`` by :func:`ratio_metric`."""

    ratio: Ratio | None = None


def per_sample_values(num: Tensor, den: Tensor) -> Tensor:
    """``(N, K)`` ratios → ``(N,)``: mean of ``num/den`` over the entries with ``den > 0``
    (0 for a sample without any)."""
    valid = den > 0
    ratios = torch.where(valid, num / den.clamp_min(1e-12), torch.zeros_like(num))
    count = valid.sum(1)
    return torch.where(count > 0, ratios.sum(1) / count.clamp_min(1), torch.zeros_like(count))


def pooled_value(num: Tensor, den: Tensor) -> float:
    """``(K,)`` split-wide sums → the mean of ``num/den`` over entries with ``den > 0``."""
    return float(per_sample_values(num.reshape(1, -1), den.reshape(1, -1))[0])


def ratio_metric(name: str, lower_is_better: bool, ratio: Ratio) -> RatioMetric:
    """A metric whose per-sample value is the mean ratio of :func:`per_sample_values`."""
    return RatioMetric(
        name,
        lower_is_better,
        batch_sum=lambda pred, batch: per_sample_values(*ratio(pred, batch)).sum(),
        ratio=ratio,
    )


def _per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1, keepdim=True).double()


def pixel_accuracy_ratio(log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Correct and valid (target ≥ 0) pixels per sample."""
    valid = target >= 0
    correct = (log_probs.argmax(1) == target) & valid
    return _per_sample_sum(correct), _per_sample_sum(valid)


def iou_ratio(log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-class intersection and union over the valid pixels, ``(N, C)`` each."""
    n, classes = log_probs.shape[:2]
    valid = target >= 0
    pred = log_probs.argmax(1)
    sample = torch.arange(n, device=target.device).view(n, 1, 1).expand_as(target)

    def counts(labels: Tensor, mask: Tensor) -> Tensor:
        key = sample[mask] * classes + labels[mask]
        return torch.bincount(key, minlength=n * classes).view(n, classes).double()

    inter = counts(target, valid & (pred == target))
    union = counts(target, valid) + counts(pred, valid) - inter
    return inter, union


def masked_l1_ratio(
    pred: Tensor, target: Tensor, valid: Tensor, relative: bool = False
) -> tuple[Tensor, Tensor]:
    """Σ|pred − target| (÷ target if ``relative``) and the number of valid entries, per sample
    (``valid`` broadcasts over channels: a valid pixel counts once per channel)."""
    valid = valid.expand_as(target)
    err = (pred - target).abs()
    if relative:
        err = err / torch.where(valid, target, torch.ones_like(target))
    return _per_sample_sum(torch.where(valid, err, torch.zeros_like(err))), _per_sample_sum(valid)


def angle_ratio(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Σ angle (degrees) between predicted and true normals, and the count, over the pixels
    with a non-zero true normal."""
    valid = target.abs().sum(1) > 0
    cos = (pred * target).sum(1).clamp(-1.0, 1.0)
    angle = torch.rad2deg(torch.acos(cos))
    return _per_sample_sum(torch.where(valid, angle, torch.zeros_like(angle))), _per_sample_sum(
        valid
    )


# --------------------------------------------------------------------------------------------
# Losses and tasks
# --------------------------------------------------------------------------------------------


def _zero(pred: Tensor) -> Tensor:
    return pred.sum() * 0.0  # keeps the graph: a batch without valid pixels adds nothing


def segmentation_loss(log_probs: Tensor, target: Tensor) -> Tensor:
    """NLL over the batch's valid pixels (ignore index −1)."""
    if not bool((target >= 0).any()):
        return _zero(log_probs)
    return F.nll_loss(log_probs, target, ignore_index=IGNORE_INDEX)


def masked_l1_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean ``|pred − target|`` over the batch's valid entries."""
    valid = valid.expand_as(target)
    if not bool(valid.any()):
        return _zero(pred)
    return (pred - target).abs()[valid].mean()


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 − mean cosine between (unit) predicted and true normals over the valid pixels."""
    valid = target.abs().sum(1) > 0
    if not bool(valid.any()):
        return _zero(pred)
    return 1.0 - (pred * target).sum(1)[valid].mean()


def segmentation_task(name: str) -> TaskSpec:
    """NLL loss; pixel accuracy ↑ and per-sample mIoU ↑ (module docstring)."""
    return TaskSpec(
        name=name,
        loss=lambda pred, b: segmentation_loss(pred, b[name]),
        metrics=(
            ratio_metric("pixel_acc", False, lambda pred, b: pixel_accuracy_ratio(pred, b[name])),
            ratio_metric("miou", False, lambda pred, b: iou_ratio(pred, b[name])),
        ),
        loss_type="classification",
    )


def _valid(name: str, batch: Batch) -> Tensor:
    """A task's validity mask: ``batch[name + "_valid"]`` if present, else target > 0."""
    key = f"{name}_valid"
    return batch[key] if key in batch else batch[name] > 0


def l1_task(name: str, relative: bool = True) -> TaskSpec:
    """Masked L1 loss; metrics L1-abs ↓ (and L1-rel ↓ if ``relative``) over valid pixels."""
    metrics = [
        ratio_metric(
            "l1_abs", True, lambda pred, b: masked_l1_ratio(pred, b[name], _valid(name, b))
        )
    ]
    if relative:
        metrics.append(
            ratio_metric(
                "l1_rel",
                True,
                lambda pred, b: masked_l1_ratio(pred, b[name], _valid(name, b), relative=True),
            )
        )
    return TaskSpec(
        name=name,
        loss=lambda pred, b: masked_l1_loss(pred, b[name], _valid(name, b)),
        metrics=tuple(metrics),
        loss_type="regression",
    )


def normal_task(name: str) -> TaskSpec:
    """1 − cosine loss; mean angle error in degrees ↓ over pixels with a non-zero true normal."""
    return TaskSpec(
        name=name,
        loss=lambda pred, b: normal_loss(pred, b[name]),
        metrics=(ratio_metric("mean_angle", True, lambda pred, b: angle_ratio(pred, b[name])),),
        loss_type="regression",
    )


@torch.no_grad()
def evaluate_pooled(
    model: MultiTaskModel,
    problem: Problem,
    split: Split,
    batch_size: int = 16,
    task_input: TaskInput | None = None,
) -> dict[str, dict[str, float]]:
    """Split-level (pixel-pooled) values of every metric, as the reference code reports them:
    pixel accuracy and L1 errors as means over all valid pixels of the split, mIoU from the
    split's confusion counts. Metrics that are not :class:`RatioMetric` get their usual
    per-sample mean."""
    was_training = model.training
    model.eval()
    nums: dict[tuple[str, str], Tensor] = {}
    dens: dict[tuple[str, str], Tensor] = {}
    sums: dict[tuple[str, str], float] = {}
    for batch in split.batches(batch_size):
        _, outputs = model(batch["x"], task_input)
        for task, pred in outputs.items():
            for metric in problem.task(task).metrics:
                key = (task, metric.name)
                if isinstance(metric, RatioMetric) and metric.ratio is not None:
                    num, den = metric.ratio(pred, batch)
                    nums[key] = nums.get(key, 0) + num.sum(0)
                    dens[key] = dens.get(key, 0) + den.sum(0)
                else:
                    sums[key] = sums.get(key, 0.0) + float(metric.batch_sum(pred, batch))
    model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for (task, name), num in nums.items():
        out.setdefault(task, {})[name] = pooled_value(num, dens[(task, name)])
    for (task, name), total in sums.items():
        out.setdefault(task, {})[name] = total / len(split)
    return out


def normalise_images(x: Tensor, scale: float = 1.0 / 255.0) -> Tensor:
    """``(N, 3, H, W)`` RGB → float, × ``scale`` (to [0, 1]), ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * scale - mean) / std


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize at pixel centres, ``⌊(i + ½)·source/target⌋``
    (exact integer arithmetic)."""
    return ((2 * np.arange(target) + 1) * source) // (2 * target)


def resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes ``(H₀, W₀)`` to ``shape`` = (W, H); values
    are only selected, never mixed, so labels stay integral."""
    w, h = shape
    rows, cols = nearest_indices(a.shape[-2], h), nearest_indices(a.shape[-1], w)
    return a[..., rows, :][..., cols]


def train_val_indices(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices carved from ``n`` samples: the first ``int(fraction·n)`` of
    ``numpy.random.RandomState(seed).permutation(n)`` and the rest (Gama & Grassi's Cityscapes
    split, ``np.random.seed(0); np.random.choice(files, int(0.8·n), replace=False)``, is the
    same set). Both sides keep at least one sample."""
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    order = np.random.RandomState(seed).permutation(n)
    k = min(max(int(fraction * n), 1), n - 1)
    return order[:k], order[k:]


def official_splits(
    train: dict[str, Tensor],
    test: dict[str, Tensor],
    fraction: float,
    seed: int,
    prepare_train: Callable[[Batch], Batch],
    prepare: Callable[[Batch], Batch],
) -> dict[str, Split]:
    """train / val carved from the official training arrays (:func:`train_val_indices`),
    test = the official validation arrays (the dense benchmarks' protocol)."""
    indices = train_val_indices(len(train["x"]), fraction, seed)
    train_idx, val_idx = (torch.from_numpy(i) for i in indices)
    return {
        "train": Split({k: v[train_idx] for k, v in train.items()}, prepare_train),
        "val": Split({k: v[val_idx] for k, v in train.items()}, prepare),
        "test": Split(test, prepare),
    }


def data_dir_from(data_dir: str | Path | None, env_var: str, dataset: str, layout: str) -> Path:
    """``data_dir``, else ``$env_var``; a clear error naming the expected layout otherwise."""
    chosen = data_dir if data_dir is not None else os.environ.get(env_var)
    if chosen is None:
        raise FileNotFoundError(f"no {dataset} data_dir given. {layout}")
    return Path(chosen).expanduser()


def array_cache_folder(
    root: Path, dataset: str, split: str, shape: tuple[int, int], key: list
) -> Path:
    """``root/dataset/<split>_<W>x<H>_<digest>``, the digest a hash of ``key`` (what the
    cached arrays depend on)."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return root / dataset / f"{split}_{shape[0]}x{shape[1]}_{digest}"


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], marker: str, text: str) -> None:
    """Write each array to ``folder/<name>.npy``, then the completion marker ``folder/marker``
    holding ``text``, each atomically with its sha256 recorded (:mod:`mtopt.problems.cache`: a
    killed run never leaves a truncated array, and a marker means every array was written)."""
    for name, array in arrays.items():
        cache_files.save_npy(folder / f"{name}.npy", array)
    cache_files.write_bytes(folder / marker, text.encode())


def load_arrays(folder: Path, names: Sequence[str], marker: str) -> dict[str, np.ndarray] | None:
    """The arrays :func:`save_arrays` wrote in ``folder``, each checked against its recorded
    sha256 and loaded without pickles; ``None`` when the marker is missing or any array is
    missing or damaged (damaged and unverified ones are moved aside), so the caller rebuilds."""
    if not (folder / marker).is_file():
        return None
    hits = {
        name: cache_files.read_file(folder / f"{name}.npy", cache_files.load_npy) for name in names
    }
    arrays: dict[str, np.ndarray] = {}
    for name, hit in hits.items():
        if hit.value is None:
            return None
        arrays[name] = hit.value
    return arrays


def check_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Validate a ``(W, H)`` image shape (two positive integers)."""
    try:
        w, h = (operator.index(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (W, H) with two integers, got {shape!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return w, h


class DenseProblem(Problem):
    """What Cityscapes and NYUv2 share: a dilated-ResNet encoder with DeepLab heads
    (:func:`dense_model`), official train/val files split into train/validation/test
    (:func:`official_splits`), and the options of both. A subclass sets ``name``, ``tasks``,
    ``train_fraction`` and ``split_seed`` and implements :meth:`_arrays`, :meth:`_prepare`,
    :meth:`head_outputs` and :meth:`out_size`."""

    #: a sensible ``evaluate`` batch size for dense maps (its default, 1000, is meant for MNIST)
    eval_batch_size = 16
    train_fraction: float
    split_seed: int = 0

    def _model_options(
        self,
        *,
        data_dir: str | Path | None,
        encoder: str,
        pretrained: str | Path | bool | None,
        width: int,
        head_channels: int,
        encoder_dropout: float,
        cache: str | Path | None,
    ) -> None:
        self.data_dir = data_dir
        self.encoder = encoder
        self.pretrained = pretrained
        self.width = width
        self.head_channels = head_channels
        self.encoder_dropout = encoder_dropout
        self.cache = cache
        self._splits: dict[str, Split] | None = None

    def _arrays(self, split: str) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """The tensors of an official split (``"train"`` or ``"val"``)."""
        raise NotImplementedError

    def _prepare(self, batch: Batch, train: bool) -> Batch:  # pragma: no cover - abstract
        """A stored batch as the model and the tasks read it (``train``: may augment)."""
        raise NotImplementedError

    def head_outputs(self) -> dict[str, tuple[int, str]]:  # pragma: no cover - abstract
        """Task → (output channels, output activation) of its head."""
        raise NotImplementedError

    def out_size(self) -> tuple[int, int]:  # pragma: no cover - abstract
        """(H, W) of the model's outputs."""
        raise NotImplementedError

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            self._splits = official_splits(
                self._arrays("train"),
                self._arrays("val"),
                self.train_fraction,
                self.split_seed,
                lambda batch: self._prepare(batch, True),
                lambda batch: self._prepare(batch, False),
            )
        return self._splits

    def make_model(
        self, tasks: Sequence[str] | None = None, dropout: float = 0.0
    ) -> MultiTaskModel:
        names = self.model_tasks(tasks)
        outputs = self.head_outputs()
        return dense_model(
            {name: outputs[name] for name in names},
            out_size=self.out_size(),
            arch=self.encoder,
            width=self.width,
            head_channels=self.head_channels,
            dropout=dropout,
            encoder_dropout=self.encoder_dropout,
            pretrained=resolve_pretrained(self.encoder, self.pretrained, self.width),
        )
