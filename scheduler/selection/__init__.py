"""Client selection (`--selection`): who trains among the on-line phones, from what the scheduler learns.

- `uniform` (the default): at random among the on-line phones; no `Selection` object, nothing reported.
- `oort` (`oort.py`): Lai et al.'s Oort, useful (high loss) and fast clients, as FedScale runs it.
- `power-of-choice` (`power_of_choice.py`): Cho et al.'s rpow-d, the highest last reported losses of d.
- `module:Class`: your own selector (`base.py` gives the interface and an example).

`driver.py` is the scheduler's side: the pool of candidates, the clients' reports (`ClientReport`: a few
numbers per client, never its update), determinism at any -np, checkpoints, and FedBuff's causality rule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from flock.common.errors import ConfigError
from scheduler.selection.driver import Selection

if TYPE_CHECKING:
    from flock.common.config import Config

UNIFORM = "uniform"


def _oort(config: Config) -> Any:
    from scheduler.selection.oort import Oort, oort_settings

    return Oort(settings=oort_settings(config))


def _power_of_choice(config: Config) -> Any:
    from scheduler.selection.power_of_choice import PowerOfChoice

    return PowerOfChoice(d=config.selection_pool)


BUILTIN: dict[str, Callable[[Config], Any]] = {"oort": _oort, "power-of-choice": _power_of_choice}
NAMES = (UNIFORM, *BUILTIN)


def make_selection(config: Config) -> Selection | None:
    """The run's client selection, or None for uniform selection (the scheduler's own path). A `module:Class`
    is loaded, checked against the interface and built once here (a fault is a ConfigError naming
    --selection)."""
    name = config.selection
    if name == UNIFORM:
        return None
    if name in BUILTIN:
        make = BUILTIN[name]
    else:
        from flock.common.plugins import resolve

        cls = resolve("selection", name)

        def make(config: Config) -> Any:
            try:
                return cls(config=config)
            except TypeError as e:
                raise ConfigError(f"--selection {name}: its constructor must take config= keyword ({e})") from None
    return Selection(lambda: make(config), name=name, seed=config.seed, asynchronous=bool(config.async_buffer))
