"""flock as a library.

    from flock import Config, simulate
    history = simulate(Config(data_dir="lm_data", rounds=5))    # one process, no MPI
    history.metric("top1")                                        # [(round, value), ...]

    from flock import launch
    history = launch(Config(data_dir="lm_data", rounds=5), np=2)  # the same run on 2 MPI ranks

`read_metrics(run_dir)` reads any run's records back.
"""
from flock.common.config import Config
from flock.common.recorder import read_metrics
from flock.run import History, launch, simulate

__all__ = ["Config", "History", "launch", "read_metrics", "simulate"]
__version__ = "0.3.0"
