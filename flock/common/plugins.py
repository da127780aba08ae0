"""Resolving `--reader/--model/--trainer` (and `--aggregator`, `--selection`) values: a built-in short name
or a dotted path `module:Class`."""
from __future__ import annotations

import importlib

from flock.common.errors import ConfigError

BUILTINS = {
    "reader": {"leaf": "reader.leaf:LeafRedditReader", "arrays": "reader.arrays:ArrayReader"},
    "model": {"lstm": "model.lstm:RedditLSTM", "lstm-personal": "model.lstm:PersonalRedditLSTM",
              "mlp": "model.mnist:MnistMLP", "cnn": "model.mnist:MnistCNN",
              "cnn-personal": "model.mnist:PersonalMnistCNN",
              "mlp-personal": "model.mnist:PersonalMnistMLP", "fedem-mlp": "model.fedem:FedEMMLP",
              "fedem-cnn": "model.fedem:FedEMCNN", "simple-cnn": "model.cifar:SimpleCNN"},
    "trainer": {"lm": "trainer.lm:LanguageModelTrainer", "classifier": "trainer.classifier:ClassifierTrainer",
                "fedem": "trainer.fedem:FedEMTrainer"},
    "aggregator": {},       # built-ins are scheduler/aggregators.py's; here only module:Class paths
    "selection": {},        # built-ins are scheduler/selection/'s; here only module:Class paths
}


# what each plug-in kind must have (the Protocols in reader/base.py, model/base.py, trainer/base.py)
REQUIRED = {
    "reader": ("prepare", "days", "has_split", "index", "load", "spec"),
    "model": ("build",),
    "trainer": ("train", "evaluate", "train_ratios", "eval_ratios"),
    "aggregator": ("capability", "aggregate", "check"),
    "selection": ("pool_size", "select", "observe", "state_dict", "load_state_dict"),
}


INTERFACES = {"aggregator": "scheduler/aggregators.py", "selection": "scheduler/selection/base.py"}


def resolve(kind: str, name: str) -> type:
    """The class named by `name` for option `--<kind>`, checked against its Protocol when loaded; a
    ConfigError says what is wrong (the module, the name, or the missing methods)."""
    cls = _load(kind, name)
    missing = [m for m in REQUIRED[kind] if not hasattr(cls, m)]
    if missing:
        raise ConfigError(f"--{kind} {name!r}: {getattr(cls, '__name__', cls)!s} lacks {', '.join(missing)} "
                          f"(see {INTERFACES.get(kind, f'{kind}/base.py')} for the interface)")
    return cls


def _load(kind: str, name: str) -> type:
    path = BUILTINS[kind].get(name, name)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--{kind} {name!r}: not a built-in ({', '.join(sorted(BUILTINS[kind]))}) "
                          f"nor a 'module:Class' path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--{kind} {name!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"--{kind} {name!r}: module {module_name!r} has no {attr!r}") from None
