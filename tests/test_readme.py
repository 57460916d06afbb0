"""Every ```python block of the README runs, so an example can never rot.

Each block is matched to one spec below by a line it contains. A spec gives the names the
block assumes (a tiny model, a loader) and size reductions, each of which must match the
block's text exactly — a README edit that breaks a reduction fails here, as does a new block
without a spec. Blocks run in a temporary folder (their ``runs/...`` paths land there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meanwise.trajectory.data import resolve_data_dir

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Spec:
    key: str  # a line fragment that identifies the block
    prelude: str = ""
    replace: tuple[tuple[str, str], ...] = ()
    needs_data: bool = False
    marks: tuple = field(default=())


_TINY_MODEL = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
loss_fn = torch.nn.functional.cross_entropy
g = torch.Generator().manual_seed(0)
loader = [(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
          for _ in range(4)]
"""

SPECS = [
    Spec("from meanwise.optim import AdaBelief, DiffGrad, AdaHessian", prelude=_TINY_MODEL),
    Spec("opt = AdaBelief(model.parameters(), lr=1e-2, fused=True)"),  # compiles: ~20 s of CPU
    Spec(
        "from meanwise.functional import adabelief",
        prelude="""
import torch
t = 1
stacked_params, stacked_grads = torch.randn(5, 3), torch.randn(5, 3)
stacked_m, stacked_s = torch.zeros(5, 3), torch.zeros(5, 3)
""",
    ),
    Spec(
        "from meanwise.average import weighted_average, average_state_dicts",
        prelude="""
import torch
stacked, weights = torch.randn(3, 4), torch.tensor([1.0, 2.0, 3.0])
updates, N = torch.randn(3, 4), 10
sd_a, sd_b = {"w": torch.randn(2, 2)}, {"w": torch.randn(2, 2)}
fisher_a, fisher_b = {"w": torch.rand(2, 2)}, {"w": torch.rand(2, 2)}
""",
    ),
    Spec(
        "from meanwise.federated import (FedAU, FederatedSimulator",
        replace=(
            (
                "digits_federated(n_clients=100, alpha=0.1)",
                "digits_federated(n_clients=8, alpha=0.1)",
            ),
            ("FedAU(100)", "FedAU(8)"),
            ("eval_every=50, checkpoint_every=100", "eval_every=2, checkpoint_every=2"),
            ("sim.run(500, resume=True)", "sim.run(4, resume=True)"),
        ),
    ),
    Spec(
        "from meanwise.federated.flower import FedAUStrategy",
        prelude="""
import torch
from flwr.app import Context

def model_fn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3))

def data_fn(context: Context):
    g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
""",
        replace=(
            ("FedAUStrategy(n_nodes=100, cutoff=50)", "FedAUStrategy(n_nodes=3, cutoff=50)"),
            ("num_rounds=300, timeout=60", "num_rounds=2, timeout=60"),
            (
                "AFACS(100, server_lr=1.0, local_lr=0.05, arrivals_per_round=10)",
                "AFACS(3, server_lr=1.0, local_lr=0.05, arrivals_per_round=2)",
            ),
            ("num_rounds=500, max_staleness=4", "num_rounds=2, max_staleness=4"),
            ("num_supernodes=100", "num_supernodes=3"),
        ),
        marks=(pytest.mark.slow,),  # Ray's start-up alone is ~30 s; test_flower runs it by default
    ),
    Spec(
        "from meanwise.gossip import GossipProtocol, GossipSimulator",
        replace=(
            ('digits_nodes(50, "iid")', 'digits_nodes(10, "iid")'),
            ("random_regular(50, 8)", "random_regular(10, 4)"),
            ("sim.run(1000, resume=True)", "sim.run(30, resume=True)"),
        ),
    ),
    Spec(
        "from meanwise.merging import diagonal_fisher, fisher_merge",
        prelude="""
import torch
torch.manual_seed(0)
models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()) for _ in range(2)]
for m in models:
    m.add_module("head", torch.nn.Linear(6, 3))
loader = [torch.randn(10, 4)]
""",
    ),
    Spec(
        "from meanwise.merging import diagonal_fisher, save_safetensors",
        replace=(("work = Path(tempfile.mkdtemp())", 'work = Path(".")'),),
    ),
    Spec("from meanwise.trajectory.social_implicit import SocialImplicit", needs_data=True),
    Spec("from meanwise.trajectory.train import TrainConfig, train_social_implicit"),
    Spec("from meanwise.testing import assert_equivariant"),
    Spec("from meanwise.average import RunningWeightedSum, weighted_average"),
    Spec("from meanwise.engine import LocalTrainer, LocalTraining, Population, draw_batches"),
    Spec("from meanwise.merging import MergeMethod, TaskArithmetic, merge_states"),
    Spec(
        "from meanwise.symmetry import FrameAveraging",
        prelude="""
import torch
class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 3)
    def forward(self, points, mask=None, velocities=None):
        return points + self.net(torch.cat([points, velocities], -1))
backbone = Backbone()
points, velocities = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
mask = torch.ones(2, 5, dtype=torch.bool)
""",
    ),
]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _spec_for(block: str) -> Spec:
    matches = [s for s in SPECS if s.key in block]
    if len(matches) != 1:
        raise AssertionError(
            f"README block starting {block.splitlines()[0]!r} matches {len(matches)} specs in "
            "tests/test_readme.py; give it exactly one"
        )
    return matches[0]


def _params():
    out = []
    for i, block in enumerate(_blocks()):
        spec = next((s for s in SPECS if s.key in block), None)
        marks = spec.marks if spec else ()
        out.append(pytest.param(i, block, id=f"block{i}", marks=marks))
    return out


def test_every_spec_has_its_block():
    blocks = _blocks()
    for spec in SPECS:
        assert sum(spec.key in b for b in blocks) == 1, f"no README block for spec {spec.key!r}"


@pytest.mark.parametrize("index, block", _params())
def test_readme_block_runs(index, block, tmp_path, monkeypatch):
    spec = _spec_for(block)
    if spec.needs_data:
        data = resolve_data_dir()
        if data is None:
            pytest.skip("ETH/UCY data not found: set MEANWISE_DATA_DIR or place ../shared/data")
        block = block.replace("../shared/data", str(data))
    for old, new in spec.replace:
        assert old in block, f"README block {index} no longer contains {old!r}"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(spec.prelude + "\n" + block, f"README.md block {index}", "exec"), namespace)
