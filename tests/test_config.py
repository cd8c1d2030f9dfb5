"""Config files, argument strings, validation, and the command line's one-line errors."""

import importlib.util
import os
import subprocess
import sys

import pytest

from mdjax import config as config_lib
from mdjax.errors import ConfigError, UnknownConfigKeyError, UserError
from mdjax.pipeline import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = ["default", "cifar10", "caltech101", "cars", "heritage", "ham10000"]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg), module


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_validates_and_documents_its_command(name):
  config, module = load_config(name)
  config_lib.validate(config)
  assert config.data.name == ("digits" if name == "default" else name)
  assert f"configs/{name}.py" in module.__doc__  # the docstring shows the command that runs it


def test_paper_hyperparameters():
  cifar, _ = load_config("cifar10")
  cars, _ = load_config("cars")
  assert (cifar.train.epochs, cifar.finetune.epochs, cifar.train.batch_size) == (30, 30, 28)
  assert (cars.train.epochs, cars.train.batch_size) == (20, 20)
  assert cars.mistake.nsamples_ratio == 0.5
  assert plan.nwpc_count("auto", 196) == 40  # ceil(0.2 n) above 20 classes
  assert plan.nwpc_count("auto", 10) == 5  # ceil(0.5 n) otherwise
  assert plan.nwpc_count("auto", 7) == 4
  assert plan.nwpc_count(0.25, 10) == 3  # a fraction, rounded up
  assert plan.nwpc_count(3, 10) == 3


def test_argument_string_selects_ablations():
  config, _ = load_config("cars", "optimizer=adam,activation=gelu,backbone=efficientnet_b7,nwpc=7")
  assert config.train.optimizer == "adam"
  assert config.model.activation == "gelu"
  assert config.model.backbone == "efficientnet_b7"
  assert config.mistake.nwpc == 7
  config_lib.validate(config)


def test_smoke_shrinks_every_config():
  for name in CONFIG_FILES:
    config, _ = load_config(name, "smoke")
    config_lib.validate(config)
    assert config.train.epochs <= 2 and config.gan.steps <= 50 and config.data.image_size <= 32


def test_datasets_choose_their_augmentation():
  """No mirroring for digits; photos train on random resized crops and evaluate on a centre crop."""
  assert load_config("default")[0].data.augment == "crop"
  assert load_config("cifar10")[0].data.augment == "crop_flip"
  for name in ("cars", "caltech101", "heritage", "ham10000"):
    assert load_config(name)[0].data.augment == "resized_crop_flip", name


def test_limited_variant_keeps_twenty_images_per_class_and_combines_with_others():
  config, _ = load_config("default", "limited,seed=3")
  config_lib.validate(config)
  assert config.data.max_train_per_class == 20 and config.seed == 3
  assert config.train.epochs > load_config("default")[0].train.epochs  # about as many steps
  with pytest.raises(ConfigError, match="limited"):  # the error lists the file's variants
    load_config("default", "limitd")


def test_filter_threshold():
  config, _ = load_config("default")
  assert plan.filter_threshold(config.mistake.filter, 10) is None  # the paper keeps all
  assert plan.filter_threshold("1/n", 10) == pytest.approx(0.1)
  config.mistake.filter = "0.5"  # as a command-line override arrives
  config_lib.validate(config)
  assert plan.filter_threshold(config.mistake.filter, 10) == 0.5


@pytest.mark.parametrize("arg", ["smok", "no_such_key=1", "train.nope=2"])
def test_bad_argument_string(arg):
  with pytest.raises(UserError):
    load_config("default", arg)


# ------------------------------------------------------------------------------------------------
# Locked configs: a key base_config() does not define is refused wherever it is set.
# ------------------------------------------------------------------------------------------------
def test_base_config_is_locked_also_the_untyped_mistake_section():
  config = config_lib.base_config()
  config.train.epochs = 3  # defined keys still take values
  config.mistake.nwpc = 0.5  # mistake is not type-safe: any type, but still only its own keys
  for section, key in ((config.train, "epoch"), (config.mistake, "nwpcc"), (config, "trian")):
    with pytest.raises(AttributeError, match="locked"):
      setattr(section, key, 3)


def test_argument_string_typo_names_the_key_and_the_argument():
  with pytest.raises(UnknownConfigKeyError) as info:
    load_config("default", "smoke,train.epoch=3")
  message = str(info.value)
  assert "'train.epoch'" in message and "config argument 'train.epoch=3'" in message
  assert "did you mean 'train.epochs'?" in message and "\n" not in message


def write_typo_config(tmp_path, line="config.train.epoch = 3", name="typo.py"):
  path = tmp_path / name
  path.write_text("from mdjax import config as config_lib\n\n\ndef get_config(arg=None):\n"
                  f"  config = config_lib.base_config()\n  {line}\n"
                  "  return config_lib.finalize(config, arg)\n")
  return path


def test_config_file_typo_is_refused_when_the_file_runs(tmp_path):
  spec = importlib.util.spec_from_file_location("typo", write_typo_config(tmp_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(AttributeError, match='"epoch" does not exist'):
    module.get_config()



@pytest.mark.parametrize("key, value, fragment", [
    ("data.name", "imagenet", "one of digits"),
    ("model.backbone", "vgg", "one of wrn10_1"),
    ("model.activation", "tanh", "one of selu"),
    ("train.optimizer", "lamb", "one of sgd"),
    ("train.batch_size", 0, "a positive integer"),
    ("mistake.nwpc", -1, "'auto', a class count"),
    ("mistake.nwpc", 1.5, "'auto', a class count"),
    ("mistake.nsamples_ratio", -0.5, "a number >= 0"),
    ("gan.resolution", 48, "one of 32"),
    ("gan.ensemble", "pmap", "one of auto"),
    ("gan.diffaug", "color,blur", "subset of color"),
    ("data.val_fraction", 1.5, "a fraction"),
    ("stages", "train,dream", "subset of train"),
    ("data.augment", "flip", "one of none, crop"),
    ("data.max_train_per_class", -1, "an integer >= 0"),
    ("mistake.filter", "high", "'none'"),
    ("mistake.filter", 1.5, "in (0, 1)"),
    ("seeds", "0,x", "comma-separated integers"),
    ("train.mix", "cutout", "one of none, mixup, cutmix, hardmix"),
    ("train.mix_alpha", 0.0, "Beta(alpha, alpha)"),
    ("train.hardmix_fraction", 0.0, "in (0, 1]"),
    ("train.pgd_eps", 8.0, "a radius in [0, 1]"),
    ("train.pgd_steps", 0, "a positive integer"),
    ("data.randaugment_layers", -1, "an integer >= 0"),
    ("data.randaugment_magnitude", 31, "from 0 to 30"),
])
def test_validation_names_key_value_and_allowed(key, value, fragment):
  config = config_lib.base_config()
  section, _, leaf = key.rpartition(".")
  node = config[section] if section else config
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  assert f"config.{key}=" in message and fragment in message and "\n" not in message


def test_nwpc_larger_than_number_of_classes():
  config = config_lib.base_config()
  config.mistake.nwpc = 11
  config_lib.validate(config)  # unknown class count: fine
  with pytest.raises(ConfigError, match=r"at most the number of classes \(10\)"):
    config_lib.validate(config, num_classes=10)


def test_nwpc_override_given_as_text_becomes_a_number():
  config = config_lib.base_config()
  config.mistake.nwpc = "3"
  config_lib.validate(config)
  assert config.mistake.nwpc == 3


def run_main(*args, env=None):
  return subprocess.run([sys.executable, "-m", "mdjax.main", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, fragment", [
    (["--config.no_such=1"], "unknown config key 'no_such'"),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
    (["--config.model.backbone=vgg"], "config.model.backbone='vgg'"),
    (["--config=configs/nope.py"], "cannot load the config file"),
    (["--config=configs/default.py:smok"], "'smok'"),
])
def test_command_line_errors_are_one_line_with_status_2(args, fragment):
  result = run_main(*args)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("mdjax: error:")]
  assert len(lines) == 1 and fragment in lines[0], result.stderr


def one_line_error(result) -> str:
  """The single stderr line of a user mistake (exit status 2, no traceback)."""
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mdjax: error: "), result.stderr
  return lines[0]


@pytest.mark.parametrize("where", ["file", "file_section_variable", "argument", "flag",
                                   "flag_mistake"])
def test_unknown_key_stops_the_run_naming_key_and_place(tmp_path, where):
  """A typo in the config file, its argument string or a --config flag: one line, status 2."""
  workdir = tmp_path / "run"
  args = {
      "file": [f"--config={write_typo_config(tmp_path)}"],
      "file_section_variable": [
          f"--config={write_typo_config(tmp_path, 't = config.train; t.epoch = 3', 'typo2.py')}"],
      "argument": ["--config=configs/default.py:smoke,train.epoch=3"],
      "flag": ["--config.train.epoch=3"],
      "flag_mistake": ["--config.mistake.nwpcc=2"],
  }[where]
  line = one_line_error(run_main(*args, f"--workdir={workdir}"))
  key, suggestion = ("mistake.nwpcc", "mistake.nwpc") if where == "flag_mistake" else \
      ("train.epoch", "train.epochs")
  assert f"unknown config key '{key}'" in line and f"did you mean '{suggestion}'?" in line
  place = {"file": "typo.py line 6: `config.train.epoch = 3`",
           "file_section_variable": "typo2.py line 6: `t = config.train; t.epoch = 3`",
           "argument": "config argument 'train.epoch=3'",
           "flag": "from the flag --config.train.epoch=3",
           "flag_mistake": "from the flag --config.mistake.nwpcc=2"}[where]
  assert place in line, line
  assert not workdir.exists()


def test_missing_dataset_says_where_and_how_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = run_main("--config=configs/cars.py", f"--workdir={workdir}",
                    env={"MDJAX_DATA_DIR": str(tmp_path / "data")})
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert "Stanford Cars not found" in result.stderr and str(tmp_path / "data" / "cars") in result.stderr
  assert "car_data.zip" in result.stderr and "--config.data.root" in result.stderr
  assert not workdir.exists()
