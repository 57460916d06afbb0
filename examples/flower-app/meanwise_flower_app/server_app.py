"""The ServerApp: FedAU for ``fedau-rounds`` rounds, then AFA-CS from FedAU's model.

Nodes are bound to client slots by their ``partition-id`` (``slot-key``), so a SuperNode that
is restarted (a new node id) takes its old slot again, in both phases. Everything is read from
the run config (``[tool.flwr.app.config]``, overridden by ``flwr run . <link> -c 'lr=0.05'``).
With ``out-dir`` set, ``progress.json`` is rewritten after every FedAU round and
``result.json``, ``fedau.safetensors`` and ``afa.safetensors`` are written at the end (all
atomically).
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save as safetensors_bytes

from meanwise.atomic_io import atomic_write_bytes, atomic_write_json
from meanwise.federated import AFACS
from meanwise.federated.flower import ArrayCodec, FedAUStrategy, run_anarchic
from meanwise_flower_app.task import federated_digits, model_fn

app = ServerApp()


def _setting(config: dict[str, Any], key: str, kind: type) -> Any:
    if key not in config:
        raise ValueError(f"run config has no {key!r} (see [tool.flwr.app.config])")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ValueError(f"run config {key!r} must be a {kind.__name__}; got {value!r}")
    return value


def _save(out: Path | None, name: str, data: Any) -> None:
    if out is not None:
        atomic_write_json(out / name, data)


def _save_model(out: Path | None, name: str, arrays: ArrayRecord) -> None:
    if out is not None:
        state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        atomic_write_bytes(out / name, safetensors_bytes(state))


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = context.run_config
    n = _setting(c, "n-nodes", int)
    slot_key = _setting(c, "slot-key", str)
    wait = _setting(c, "wait-for-nodes-s", float)
    timeout = _setting(c, "round-timeout", float)
    lr, batch = _setting(c, "lr", float), _setting(c, "batch-size", int)
    steps = _setting(c, "local-steps", int)
    out = Path(_setting(c, "out-dir", str)) if c.get("out-dir") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    _, test_x, test_y = federated_digits(
        n, _setting(c, "alpha", float), _setting(c, "data-seed", int)
    )
    cutoff = _setting(c, "fedau-cutoff", int)

    strategy = FedAUStrategy(
        n,
        slot_key=slot_key,
        min_nodes=_setting(c, "min-nodes", int),
        wait_for_nodes_s=None if wait < 0 else wait,
        cutoff=cutoff or None,
        server_lr=_setting(c, "server-lr", float),
        evaluate=False,  # central evaluation below: no second round trip per round
    )
    codec_model = model_fn()
    round_seconds: list[float] = []
    clock = {"t": time.monotonic()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        codec_model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy = float((codec_model(test_x).argmax(-1) == test_y).double().mean())
        now = time.monotonic()
        if server_round > 0:
            round_seconds.append(now - clock["t"])
            log(INFO, "FedAU round %d took %.1f s", server_round, round_seconds[-1])
        clock["t"] = now
        progress = {"phase": "fedau", "round": server_round, "history": strategy.history}
        _save(out, "progress.json", {**progress, "slots": strategy.slots.state_dict()})
        return MetricRecord({"test-accuracy": accuracy})

    recipe = {"lr": lr, "batch-size": batch}
    initial = ArrayRecord(model_fn().state_dict())
    fedau = strategy.start(
        grid,
        initial,
        num_rounds=_setting(c, "fedau-rounds", int),
        timeout=timeout,
        train_config=ConfigRecord({**recipe, "local-steps": steps}),
        evaluate_fn=evaluate,
    )
    _save_model(out, "fedau.safetensors", fedau.arrays)

    afa_rounds = _setting(c, "afa-rounds", int)
    afa = None
    if afa_rounds > 0:
        # the workers choose their own step counts (the ClientApp's anarchic_steps): no
        # local-steps in this config; AFA-CS normalizes each update by its K_i and eta_L = lr
        aggregator = AFACS(
            n, server_lr=1.0, local_lr=lr, arrivals_per_round=_setting(c, "afa-arrivals", int)
        )
        afa = run_anarchic(
            grid,
            fedau.arrays,
            aggregator,
            afa_rounds,
            slots=strategy.slots,  # keep the binding: a replaced node stays replaced
            min_nodes=0,
            max_staleness=_setting(c, "afa-max-staleness", int),
            round_timeout=timeout,
            train_config=ConfigRecord(recipe),
        )
        _save_model(out, "afa.safetensors", afa.arrays)
        codec_model.load_state_dict(afa.arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy = float((codec_model(test_x).argmax(-1) == test_y).double().mean())
        log(INFO, "AFA-CS: %d rounds, test accuracy %.3f", afa_rounds, accuracy)
    _save(
        out,
        "result.json",
        {
            "fedau": {
                "history": strategy.history,
                "round_seconds": round_seconds,
                "test_accuracy": {
                    r: float(m["test-accuracy"])
                    for r, m in fedau.evaluate_metrics_serverapp.items()
                },
            },
            "afa": None if afa is None else [dataclasses.asdict(r) for r in afa.rounds],
            "slots": strategy.slots.state_dict(),
            "parameters": ArrayCodec(initial).numel,
        },
    )
