"""Plain PyTorch counterparts of mdjax's classifiers, written independently, for the benchmarks.

mdjax itself never imports torch; these modules exist so that `classifier_step.py` (speed) and
`classifier_accuracy.py` (what is learned) can run the same recipe in both frameworks and compare.
They follow the published architectures, not mdjax's code:
- the pre-activation CIFAR Wide-ResNet of Zagoruyko & Komodakis (BN-ReLU-conv3x3-BN-ReLU-conv3x3,
  a 1x1 conv of the pre-activated input where width or stride change, convs initialised as in the
  authors' code: kaiming normal, fan_out), BatchNorm eps 1e-5 / momentum 0.1;
- torchvision's ResNet-50 layout;
- the SpinalNet and Progressive SpinalNet heads as their papers write them (PyTorch's default
  nn.Linear initialisation, as the SpinalNet code uses);
- ImageNet mean/std normalisation inside the model, as mdjax's Classifier does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS = {
    "selu": F.selu,
    "gelu": F.gelu,  # the exact erf form, PyTorch's default
    "relu": F.relu,
    "mish": F.mish,
    "swish": F.silu,
}


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class WideBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1, self.conv1 = _bn(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2, self.conv2 = _bn(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = (nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                     if stride != 1 or cin != cout else None)

  def forward(self, x):
    pre = torch.relu(self.bn1(x))
    y = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
    return (self.shortcut(pre) if self.shortcut is not None else x) + y


class WideResNet(nn.Module):
  """WRN-depth-k for 32x32 inputs; returns pooled features [B, 64k]."""

  def __init__(self, depth: int = 16, k: int = 4):
    super().__init__()
    n = (depth - 4) // 6
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
    for width, stride in zip((16 * k, 32 * k, 64 * k), (1, 2, 2)):
      for i in range(n):
        layers.append(WideBlock(cin, width, stride if i == 0 else 1))
        cin = width
    self.body, self.bn, self.num_features = nn.Sequential(*layers), _bn(cin), cin
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    return torch.relu(self.bn(self.body(x))).mean((2, 3))


class Bottleneck(nn.Module):

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), _bn(planes)
    self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), _bn(planes)
    self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), _bn(planes * 4)
    self.downsample = (nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                     _bn(planes * 4)) if stride != 1 or cin != planes * 4 else None)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet50(nn.Module):

  def __init__(self):
    super().__init__()
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), _bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
      for i in range(blocks):
        layers.append(Bottleneck(cin, planes, 2 if stage > 0 and i == 0 else 1))
        cin = planes * 4
    self.body, self.num_features = nn.Sequential(*layers), cin

  def forward(self, x):
    return self.body(x).mean((2, 3))


class LinearHead(nn.Module):

  def __init__(self, features: int, num_classes: int, dropout: float):
    super().__init__()
    self.drop, self.fc = nn.Dropout(dropout), nn.Linear(features, num_classes)

  def forward(self, x):
    return self.fc(self.drop(x))


class ProgressiveSpinalHead(nn.Module):
  """d = dropout(x); x1 = act(fc1(x)); x_k = act(fc_k([d, x1..x_{k-1}])); out = fc([d, x1..x4])."""

  def __init__(self, features: int, num_classes: int, width: int, dropout: float, activation: str):
    super().__init__()
    self.act, self.drop = ACTIVATIONS[activation], nn.Dropout(dropout)
    self.hidden = nn.ModuleList(nn.Linear(features + i * width, width) for i in range(4))
    self.out = nn.Linear(features + 4 * width, num_classes)

  def forward(self, x):
    d = self.drop(x)
    outs = [self.act(self.hidden[0](x))]
    for layer in self.hidden[1:]:
      outs.append(self.act(layer(torch.cat([d, *outs], 1))))
    return self.out(torch.cat([d, *outs], 1))


class SpinalHead(nn.Module):
  """Halves a, b of dropout(x): x1 = act(fc1(a)), x2 = act(fc2([b, x1])), x3 = act(fc3([a, x2])),
  x4 = act(fc4([b, x3])); out = fc([x1..x4])."""

  def __init__(self, features: int, num_classes: int, width: int, dropout: float, activation: str):
    super().__init__()
    self.act, self.drop, self.half = ACTIVATIONS[activation], nn.Dropout(dropout), features // 2
    sizes = (self.half, features - self.half + width, self.half + width, features - self.half + width)
    self.hidden = nn.ModuleList(nn.Linear(s, width) for s in sizes)
    self.out = nn.Linear(4 * width, num_classes)

  def forward(self, x):
    d = self.drop(x)
    halves = (d[:, :self.half], d[:, self.half:])
    outs = []
    for i, layer in enumerate(self.hidden):
      inputs = halves[0] if i == 0 else torch.cat([halves[i % 2], outs[-1]], 1)
      outs.append(self.act(layer(inputs)))
    return self.out(torch.cat(outs, 1))


class Classifier(nn.Module):
  """normalise -> backbone -> head; images NCHW in [0, 1]."""

  def __init__(self, backbone: nn.Module, head: nn.Module):
    super().__init__()
    self.backbone, self.head = backbone, head
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

  def forward(self, x):
    return self.head(self.backbone((x - self.mean) / self.std))


CIFAR_WRNS = {"wrn10_1": (10, 1), "wrn10_2": (10, 2), "wrn16_2": (16, 2), "wrn16_4": (16, 4),
              "wrn28_10": (28, 10)}


def build_classifier(backbone: str, head: str, num_classes: int, *, width: int = 200,
                     dropout: float = 0.35, activation: str = "selu") -> Classifier:
  if backbone in CIFAR_WRNS:
    body = WideResNet(*CIFAR_WRNS[backbone])
  elif backbone == "resnet50":
    body = ResNet50()
  else:
    raise ValueError(f"no PyTorch reference for backbone {backbone!r}")
  f = body.num_features
  heads = {"linear": lambda: LinearHead(f, num_classes, dropout),
           "spinal": lambda: SpinalHead(f, num_classes, width, dropout, activation),
           "progressive_spinal": lambda: ProgressiveSpinalHead(f, num_classes, width, dropout,
                                                               activation)}
  return Classifier(body, heads[head]())


def sam_step(model: nn.Module, loss_fn, x, y, optimizer: torch.optim.Optimizer,
             rho: float = 0.05) -> torch.Tensor:
  """One SAM step (Foret et al.): e = rho g / ||g||, g' = grad L(w + e) at the same batch and
  dropout mask, restore w, apply g' with the base optimizer. BatchNorm running statistics come
  from the first pass only (the second pass runs with momentum 0)."""
  params = [p for p in model.parameters() if p.requires_grad]
  rng = torch.get_rng_state()
  optimizer.zero_grad(set_to_none=True)
  loss = loss_fn(model(x), y)
  loss.backward()
  with torch.no_grad():
    norm = torch.norm(torch.stack([p.grad.norm(2) for p in params if p.grad is not None]), 2)
    scale = rho / (norm + 1e-12)
    es = [p.grad * scale if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, e in zip(params, es):
      p.add_(e)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  momenta = [m.momentum for m in bns]
  for m in bns:
    m.momentum = 0.0
  torch.set_rng_state(rng)  # the same dropout mask as the first pass
  optimizer.zero_grad(set_to_none=True)
  loss_fn(model(x), y).backward()
  for m, mom in zip(bns, momenta):
    m.momentum = mom
  with torch.no_grad():
    for p, e in zip(params, es):
      p.sub_(e)
  optimizer.step()
  return loss.detach()


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int = 0, *, step_every: int = 1,
              gamma: float = 0.1):
  """The learning-rate multiplier per step: constant, cosine to 0, or x gamma every step_every."""

  def main(step):
    if schedule == "cosine":
      t = min(max(step - warmup_steps, 0), max(total_steps - warmup_steps, 1))
      return 0.5 * (1 + math.cos(math.pi * t / max(total_steps - warmup_steps, 1)))
    if schedule == "step":
      return gamma ** (step // max(step_every, 1))
    return 1.0

  def fn(step):
    if step < warmup_steps:
      return step / warmup_steps
    return main(step)

  return fn
