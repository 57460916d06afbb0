"""The example Flower App (examples/flower-app) on a real deployment: one flower-superlink and
three flower-supernode processes on 127.0.0.1, ``flwr run`` with a connection file. The node
holding partition 1 is killed (SIGKILL) after FedAU round 1 and restarted (a new node id); it
must take its old slot again, the logs must name the lost node, and the final models (FedAU, then
one AFA-CS round) must equal meanwise's FederatedSimulator on the same participation and the same
client updates. Slow (minutes: every message starts a fresh flwr-clientapp process)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="install the flower extra: pip install '.[flower]'")

from safetensors.torch import load_file  # noqa: E402

from meanwise.data.federated_split import FederatedDataset  # noqa: E402
from meanwise.federated import AFACS, FedAU, FederatedSimulator, LocalTraining  # noqa: E402
from meanwise.federated.participation import Anarchic, Arrivals, ParticipationProcess  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
N, KILLED = 3, 1
# the run config of this test (TOML values): full-batch local training (batch >= every
# partition), so the simulator sees exactly the nodes' updates
OVERRIDES = {
    "fedau-rounds": 3,
    "afa-rounds": 1,
    "afa-arrivals": 2,
    "round-timeout": 90.0,
    "wait-for-nodes-s": 60.0,
    "lr": 0.1,
    "batch-size": 4096,
    "local-steps": 3,
    "server-lr": 1.0,
}


def _free_ports(k: int) -> list[int]:
    sockets = [socket.socket() for _ in range(k)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env(home: Path) -> dict[str, str]:
    """Every process gets its own Flower home (apps, state, the connection file) in tmp."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }


def _connection_file(home: Path, link: str) -> None:
    """The connection file `flwr run` / `flwr ls` read: $FLWR_HOME/config.toml."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{link}"\n'
        "insecure = true\n"
    )


def _run_status(home: Path) -> dict:
    """The last run's entry of `flwr ls local --format json` (status, status-details)."""
    out = subprocess.run(
        [str(BIN / "flwr"), "ls", "local", "--format", "json"],
        env=_env(home), capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    return json.loads(out[out.index("{") :])["runs"][-1]


def _start_superlink(procs: Processes, tmp: Path, port: int) -> str:
    procs.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
         "--port", str(port), "--disable-runtime-dependency-installation"],
        tmp / "home-superlink",
    )  # fmt: skip
    procs.wait_for("superlink", r"Uvicorn running on", 60)
    return f"127.0.0.1:{port}"


class Processes:
    """The deployment's processes, each in its own session so that it and its children (the
    SuperExec, the flwr-clientapp processes) are stopped together by its pid."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], home: Path) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=_env(home), start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log(name))
            if found:
                return found
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{name}: no {pattern!r} within {timeout} s:\n{self.log(name)}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)  # the process group of the process started as `name`
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The aggregators' flat layout: parameters concatenated in order."""
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


class _Replay(ParticipationProcess):
    def __init__(self, masks: torch.Tensor) -> None:
        super().__init__(torch.ones(masks.shape[1]))
        self.masks = masks

    def _draw(self) -> torch.Tensor:
        return self.masks[self.round]


class _ReplayArrivals(Anarchic):
    def __init__(self, rounds: list[dict], n_workers: int, max_staleness: int) -> None:
        super().__init__(n_workers, 1, 4, max_staleness=max_staleness)
        self.recorded = rounds

    def next_round(self) -> Arrivals:
        r = self.recorded[self.round]
        self.round += 1
        t = torch.tensor
        return Arrivals(
            t(r["workers"]), t(r["steps"]), t(r["staleness"]), t(r["staleness"]), 0.0, 0
        )


def _deploy_and_run(tmp: Path, procs: Processes) -> dict:
    link_port, *node_ports = _free_ports(1 + N + 1)
    link = _start_superlink(procs, tmp, link_port)

    def supernode(name: str, partition: int, port: int) -> int:
        procs.start(
            name,
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", link,
             "--port", str(port), "--node-config",
             f"partition-id={partition} num-partitions={N}"],
            tmp / f"home-{name}",
        )  # fmt: skip
        return int(procs.wait_for(name, r"SuperNode ID: (\d+)", 60).group(1))

    node_ids = {p: supernode(f"supernode-{p}", p, node_ports[p]) for p in range(N)}
    cli_home = tmp / "home-cli"
    _connection_file(cli_home, link)
    out = tmp / "out"
    overrides = {**OVERRIDES, "out-dir": str(out)}
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    run = procs.start(
        "flwr-run",
        [str(BIN / "flwr"), "run", str(APP), "local", "--stream", "--run-config", config],
        cli_home,
    )
    # after round 1: kill the node of partition 1 and start it again (same node config)
    deadline = time.monotonic() + 300
    while (
        not (out / "progress.json").exists()
        or json.loads((out / "progress.json").read_text())["round"] < 1
    ):
        assert run.poll() is None, procs.log("flwr-run")
        assert time.monotonic() < deadline, "round 1 did not finish within 300 s"
        time.sleep(0.2)
    procs.kill(f"supernode-{KILLED}")
    restarted = supernode("supernode-restarted", KILLED, node_ports[N])
    assert run.wait(timeout=600) == 0, procs.log("flwr-run")
    status = _run_status(cli_home)
    assert status["status"] == "finished:completed", status
    return {
        "result": json.loads((out / "result.json").read_text()),
        "fedau": load_file(str(out / "fedau.safetensors")),
        "afa": load_file(str(out / "afa.safetensors")),
        "node_ids": node_ids,
        "restarted": restarted,
        "log": procs.log("flwr-run"),
    }


def test_example_app_on_a_deployment_with_a_restarted_node(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from meanwise_flower_app.task import federated_digits, model_fn

    procs = Processes(tmp_path)
    start = time.monotonic()
    try:
        got = _deploy_and_run(tmp_path, procs)
    finally:
        procs.stop_all()
    print(f"deployment test: {time.monotonic() - start:.0f} s")  # seen with pytest -s
    result, ids, new = got["result"], got["node_ids"], got["restarted"]
    history = result["fedau"]["history"]
    slots = result["slots"]

    # the run finished; slot i is partition i (bound in key order), and the restarted node
    # holds its old slot, the old id replaced
    assert [h["round"] for h in history] == [1, 2, 3]
    assert slots["slot_key"] == list(range(N))
    assert slots["node_of_slot"] == [ids[0], new, ids[2]]
    assert slots["ignored"] == {str(ids[KILLED]): f"replaced by node {new} in slot {KILLED}"}
    assert f"node {new} rejoined as slot {KILLED} (partition-id={KILLED}), replacing node " \
        f"{ids[KILLED]}" in got["log"]  # fmt: skip
    # who took part: everybody, then not the killed node, then everybody with the new node
    assert [sorted(h["slots"]) for h in history] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert sorted(history[0]["nodes"]) == sorted(ids.values())
    assert new in history[2]["nodes"] and ids[KILLED] not in history[2]["nodes"]
    # the reasons name the lost node (never the SuperLink's id 1), with its slot
    (lost,) = history[1]["reasons"]
    assert lost.startswith(f"node {ids[KILLED]} (slot {KILLED}, partition-id={KILLED}) ")
    assert "timed out" in lost or "Node Unavailable" in lost
    for h in history[2:]:  # the old id, if still listed by the SuperLink, named as replaced
        assert all(f"node {ids[KILLED]} (replaced by node {new}" in r for r in h["reasons"])
    assert not any(r.startswith("node 1 ") for h in history for r in h["reasons"])

    # the simulator on the same participation and the same (full-batch) client updates
    app_config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    fed, _, _ = federated_digits(
        N, app_config["config"]["alpha"], app_config["config"]["data-seed"]
    )
    data = FederatedDataset.from_clients([fed.client(p) for p in range(N)])
    assert max(fed.sizes.tolist()) <= OVERRIDES["batch-size"]
    lr = OVERRIDES["lr"]
    local = LocalTraining("sgd", lr=lr, steps=OVERRIDES["local-steps"], batch_size=4096)
    masks = torch.zeros(3, N, dtype=torch.bool)
    for r, h in enumerate(history):
        masks[r, [slots["slot_key"][s] for s in h["slots"]]] = True
    sim = FederatedSimulator(model_fn(), data, FedAU(N), _Replay(masks), local, eval_every=10**6)
    sim.run(3)
    names = [k for k, _ in model_fn().named_parameters()]
    fedau = flatten({k: got["fedau"][k] for k in names})
    assert not torch.allclose(fedau, flatten(dict(model_fn().named_parameters())))  # it trained
    torch.testing.assert_close(fedau, sim.x, rtol=1e-4, atol=1e-5)

    # one AFA-CS round from FedAU's model: the recorded arrivals (worker = partition, its own
    # K_i = local-steps + partition, staleness 0) replayed in the simulator
    (afa_round,) = result["afa"]
    assert len(afa_round["clients"]) == 2 and afa_round["staleness"] == [0, 0]
    workers = [slots["slot_key"][s] for s in afa_round["clients"]]
    assert afa_round["local_steps"] == [OVERRIDES["local-steps"] + w for w in workers]
    start_model = model_fn()
    start_model.load_state_dict(got["fedau"])
    replay = _ReplayArrivals(
        [{"workers": workers, "steps": afa_round["local_steps"], "staleness": [0, 0]}], N, 2
    )
    afa_sim = FederatedSimulator(
        start_model, data, AFACS(N, 1.0, lr, arrivals_per_round=2), replay, local,
        eval_every=10**6,
    )  # fmt: skip
    afa_sim.run(1)
    afa = flatten({k: got["afa"][k] for k in names})
    torch.testing.assert_close(afa, afa_sim.x, rtol=1e-4, atol=1e-5)


def test_too_few_supernodes_fail_the_run_visibly(tmp_path):
    # no SuperNode at all, min-nodes 3 within 2 s: the ServerApp logs an ERROR naming the count
    # and fails; `flwr run` itself exits 0 (Flower's CLI), the run's status says failed
    procs = Processes(tmp_path)
    try:
        link = _start_superlink(procs, tmp_path, _free_ports(1)[0])
        cli_home = tmp_path / "home-cli"
        _connection_file(cli_home, link)
        run = procs.start(
            "flwr-run",
            [str(BIN / "flwr"), "run", str(APP), "local", "--stream",
             "--run-config", "min-nodes=3 wait-for-nodes-s=2.0"],
            cli_home,
        )  # fmt: skip
        run.wait(timeout=300)
        status = _run_status(cli_home)
    finally:
        procs.stop_all()
    message = "only 0 nodes connected within 2.0 s; min_nodes=3 needed"
    assert re.search(r"ERROR.*" + re.escape(message), procs.log("flwr-run"))
    assert status["status"] == "finished:failed" and message in status["status-details"]
