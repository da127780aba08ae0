"""flock from Python, as in a notebook: build a small federated MNIST data set, run FedAvg in this process
with `simulate`, look at the History, plot it. (`launch(config, np=2)` runs the same on 2 MPI ranks.)

    python examples/notebook.py [OUT_DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # run from a checkout, no install needed

from flock import Config, simulate  # noqa: E402
from flock.plot import plot  # noqa: E402
from reader.mnist import build  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/notebook")
data = out / "mnist-iid"
if not data.exists():
    build(data, scheme="iid", users=20)          # 20 phones, 3,000 MNIST images each, IID

config = Config(data_dir=str(data), run_dir=str(out / "fedavg"), reader="arrays", model="mlp",
                trainer="classifier", rounds=6, clients_per_round=5, local_epochs=1, batch_size=50, lr=0.05,
                server_lr=1.0, max_grad_norm=0, eval_every=3, eval_users=10, checkpoint_every=0)
history = simulate(config, on_record=lambda r: print(f"  {r['kind']} round {r['round']}"))

print(history)
print("top-1 accuracy by round:", [(rnd, round(acc, 4)) for rnd, acc in history.metric("top1")])
print("final shared parameters:", {name: tuple(p.shape) for name, p in history.params.items()})
print("plot:", plot([history.run_dir], out / "fedavg.png"))
