"""kit pool's pure part (kit.poolplan) and the plan with a pool: the workers' memory lets a lead run
a model it could not hold alone; what a worker says, and why a lead refuses it."""

from __future__ import annotations

import re
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_plan import LLAMA_8B, PHI_MINI, check_invariants, host, plan_for

from kit import llamaserver, poolplan
from kit.errors import PoolError
from kit.plan import ModelOption, Overrides, make_budget, make_plan
from kit.poolplan import Worker, WorkerFacts
from kit.serveplan import plan_slots
from kit.units import GiB, MiB

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models() -> list[ModelOption]:
    """test_plan's larger models: what a pool is for."""
    return [ModelOption("phi-3.5-mini", "Phi-3.5 mini", PHI_MINI),
            ModelOption("llama-3.1-8b", "Llama 3.1 8B", LLAMA_8B)]


def facts(**changes) -> WorkerFacts:
    base = {"kit": "0.1.0", "protocol": poolplan.RPC_PROTOCOL, "memory": 6 * GiB, "threads": 4,
            "kernel": "haswell", "busy": False}
    return WorkerFacts(**{**base, **changes})


def team(*gib: float) -> list[Worker]:
    return [Worker(f"192.168.1.{20 + i}", 50052, facts(memory=int(g * GiB))) for i, g in enumerate(gib)]


def pooled_plan(name: str, models, workers: list[Worker], **overrides):
    """The lead's plan as kit.launch.planning_host makes it: the pool is the host's one device."""
    h = replace(host(name), gpus=(poolplan.pool_gpu(workers),))
    return h, make_plan(h, models, runtime_backends=frozenset({poolplan.POOL_BACKEND}), cpu_variant="haswell",
                        overrides=Overrides(**overrides))


def test_two_lent_laptops_let_an_8gb_lead_run_the_8b_it_cannot_hold_alone(models):
    alone = plan_for("laptop-8gb", models)
    assert alone.model_id == "phi-3.5-mini"
    h, pooled = pooled_plan("laptop-8gb", models, team(4, 4))
    check_invariants(pooled, h, (poolplan.POOL_BACKEND,))
    assert pooled.model_id == "llama-3.1-8b"
    assert pooled.gpu_layers == 33  # every block and the output layer: the lead keeps the embeddings
    assert pooled.estimate.ram < alone.estimate.ram
    assert "pool of 2 workers" in pooled.decision("gpu_layers").reason
    budget = make_budget(h, frozenset({poolplan.POOL_BACKEND}))
    assert budget.vram == 8 * GiB  # the workers kept their own margins: none taken twice
    serve_plan = plan_slots(pooled, next(m for m in models if m.id == "llama-3.1-8b").facts, budget)
    assert serve_plan.estimate.vram <= budget.vram and serve_plan.estimate.ram <= budget.ram


def test_a_pool_too_small_for_every_layer_takes_as_many_as_fit(models):
    h, pooled = pooled_plan("laptop-8gb", models, team(1), model="llama-3.1-8b")
    assert 0 < pooled.gpu_layers < 33
    assert pooled.estimate.vram <= 1 * GiB


def test_the_split_follows_what_each_worker_offers():
    assert poolplan.tensor_split(team(6, 2)) == [6144, 2048]
    gpu = poolplan.pool_gpu(team(6, 2))
    assert gpu.backend == "rpc" and gpu.vram_free == 8 * GiB and gpu.name == "the pool of 2 workers"


def test_llama_server_gets_the_workers_and_their_shares(models):
    h, pooled = pooled_plan("laptop-8gb", models, team(4, 4))
    budget = make_budget(h, frozenset({poolplan.POOL_BACKEND}))
    serve_plan = plan_slots(pooled, next(m for m in models if m.id == pooled.model_id).facts, budget, slots=1)
    spec = llamaserver.ServerSpec(Path("/x/llama-server"), Path("/proc/self/fd/3"), "m", serve_plan,
                                  llamaserver.LOOPBACK, 8080, Path("/x/libggml-cpu-haswell.so"),
                                  rpc=["192.168.1.20:50052", "192.168.1.21:50052"], tensor_split=[4096, 4096])
    argv = llamaserver.server_argv(spec)
    assert argv[argv.index("--rpc") + 1] == "192.168.1.20:50052,192.168.1.21:50052"
    assert argv[argv.index("--tensor-split") + 1] == "4096,4096"
    assert argv[argv.index("--n-gpu-layers") + 1] == "33"
    alone = llamaserver.server_argv(llamaserver.ServerSpec(Path("/x/llama-server"), Path("/m"), "m", serve_plan,
                                                           llamaserver.LOOPBACK, 8080, Path("/v")))
    assert "--rpc" not in alone


@pytest.mark.parametrize(("changes", "why"), [
    ({"kit": "0.0.9"}, "it runs kit 0.0.9, this lead kit 0.1.0"),
    ({"protocol": (6, 0, 0)}, "speaks protocol 6.0.0, this lead 7.0.0"),
    ({"protocol": (7, 1, 0)}, "speaks protocol 7.1.0"),
    ({"busy": True}, "already serves another lead"),
    ({"memory": 10 * MiB}, "offers only 10.0 MiB"),
])
def test_a_worker_of_another_build_or_busy_is_refused_in_one_sentence(changes, why):
    reason = poolplan.refusal(facts(**changes), kit_version="0.1.0")
    assert reason is not None and why in reason, reason
    assert poolplan.refusal(facts(), kit_version="0.1.0") is None


def test_facts_round_trip_and_anything_else_is_refused():
    f = facts()
    assert WorkerFacts.from_json(f.to_json()) == f
    for raw in (b"", b"HTTP/1.1 400 Bad Request\r\n", b'{"kit": "0.1.0"}', b"\xff\xfe",
                b'{"survival-kit-pool": 1, "kit": "0.1.0", "protocol": [7, 0], "memory": 1, "threads": 1, '
                b'"kernel": "x", "busy": false}'):
        with pytest.raises(PoolError):
            WorkerFacts.from_json(raw)


def test_the_rpc_greeting_is_read_as_rpc_server_writes_it():
    assert poolplan.HELLO_REQUEST[:1] == bytes([14]) and len(poolplan.HELLO_REQUEST) == 1 + 8 + 24
    answer = struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24)
    assert poolplan.parse_hello_answer(answer) == (7, 0, 0)
    with pytest.raises(PoolError, match="another protocol version"):
        poolplan.parse_hello_answer(struct.pack("<Q", 20) + bytes(20))
    with pytest.raises(PoolError, match="closed the connection"):
        poolplan.parse_hello_answer(b"")


def test_the_protocol_is_the_pinned_llama_cpp_s():
    sys.path.insert(0, str(ROOT / "build"))
    import base

    header = (base.llama_sources() / "ggml" / "include" / "ggml-rpc.h").read_text()
    found = tuple(int(re.search(rf"#define RPC_PROTO_{part}_VERSION\s+(\d+)", header).group(1))
                  for part in ("MAJOR", "MINOR", "PATCH"))
    assert found == poolplan.RPC_PROTOCOL
    transport = (base.llama_sources() / "ggml" / "src" / "ggml-rpc" / "transport.h").read_text()
    assert f"RPC_CONN_CAPS_SIZE = {poolplan.RPC_CONN_CAPS};" in transport


@pytest.mark.parametrize("text", ["", "host", "a:b", "10.0.0.1:0", "10.0.0.1:65535", "-x:1", "a:1,a:1",
                                  ",".join(f"10.0.0.{i}:1" for i in range(17))])
def test_bad_pool_lists_are_refused(text):
    if text == "host":  # a bare name gets the default port
        assert poolplan.parse_pool(text) == [("host", poolplan.DEFAULT_PORT)]
        return
    with pytest.raises(PoolError):
        poolplan.parse_pool(text)


def test_binding_and_offers():
    poolplan.check_bind("192.168.1.20", trusted=False)
    poolplan.check_bind("0.0.0.0", trusted=True)
    for bad in ("0.0.0.0", "::1", "eth0", "192.168.1.20:5"):
        with pytest.raises(PoolError):
            poolplan.check_bind(bad, trusted=False)
    most, why = poolplan.offer(4 * GiB, None)
    assert most == 4 * GiB - poolplan.WORKER_OVERHEAD and "usable RAM" in why
    assert poolplan.offer(4 * GiB, 2 * GiB) == (2 * GiB, "offering 2.0 GiB, as asked")
    with pytest.raises(PoolError, match="more than this computer can lend"):
        poolplan.offer(4 * GiB, 8 * GiB)
    with pytest.raises(PoolError, match="too little"):
        poolplan.offer(4 * GiB, 1 * MiB)
