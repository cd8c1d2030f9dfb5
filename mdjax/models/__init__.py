"""Classifier models: backbones (torchvision ResNets, CIFAR Wide-ResNets, EfficientNets), heads
(linear, SpinalNet, Progressive SpinalNet) and real pretrained weights read without PyTorch.

  model = models.build_classifier(config.model, num_classes)
  variables = model.init({"params": k, "dropout": k2}, images, train=False)
  logits = model.apply(variables, images, train=False)
  features = model.apply(variables, images, train=False, method=model.features)

See classifier.py for the params layout ({"backbone", "head"}) and `config.model.weights`.
"""

from mdjax.models import pretrained
from mdjax.models.backbones import build_backbone
from mdjax.models.classifier import Classifier
from mdjax.models.classifier import build_classifier
from mdjax.models.classifier import build_head
from mdjax.models.classifier import imagenet_classifier
from mdjax.models.classifier import resolve_weights

__all__ = ["Classifier", "build_backbone", "build_classifier", "build_head", "imagenet_classifier",
           "pretrained", "resolve_weights"]
