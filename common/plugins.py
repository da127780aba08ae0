"""Resolving `--reader/--model/--trainer` values: a built-in short name or a dotted path `module:Class`."""
from __future__ import annotations

import importlib

from common.errors import ConfigError

BUILTINS = {
    "reader": {"leaf": "reader.leaf:LeafRedditReader", "arrays": "reader.arrays:ArrayReader"},
    "model": {"lstm": "model.lstm:RedditLSTM", "mlp": "model.mnist:MnistMLP", "cnn": "model.mnist:MnistCNN",
              "cnn-personal": "model.mnist:PersonalMnistCNN",
              "mlp-personal": "model.mnist:PersonalMnistMLP", "fedem-mlp": "model.fedem:FedEMMLP",
              "fedem-cnn": "model.fedem:FedEMCNN"},
    "trainer": {"lm": "trainer.lm:LanguageModelTrainer", "classifier": "trainer.classifier:ClassifierTrainer",
                "fedem": "trainer.fedem:FedEMTrainer"},
}


def resolve(kind: str, name: str) -> type:
    """The class named by `name` for option `--<kind>`; a ConfigError says what is wrong."""
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
