"""The attnc op under torch.distributed: DistributedDataParallel over the transformer block,
two processes, the gloo backend on loopback.

Each rank's outputs on its half of the batch equal the single-process outputs on the whole
batch, and after one backward the DDP gradients equal the single-process gradients of the
concatenated batch within 1e-5 relative.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest

torch = pytest.importorskip("torch", reason="the torch integration needs torch installed")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402


from blocks import VOCAB, Model, synthetic_batch  # noqa: E402

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_of(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def worker(rank: int, port: int, results: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    record = {}
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(Model(use_attnc=True))
        tokens, targets = synthetic_batch(0)
        half = tokens.shape[0] // WORLD
        mine = slice(rank * half, (rank + 1) * half)
        logits = model(tokens[mine])
        record["logits"] = logits.detach().clone()
        # DDP averages gradients over ranks: the mean loss of each half, averaged, is the
        # mean loss of the whole batch.
        loss_of(logits, targets[mine]).backward()
        record["grads"] = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    except Exception:
        record["failure"] = traceback.format_exc()
    finally:
        torch.save(record, f"{results}.{rank}")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("ddp") / "rank")
    for attempt in range(2):
        try:
            mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)
            break
        except mp.ProcessExitedException:
            # gloo's threads can outlive a worker's teardown on a loaded machine ("terminate
            # called without an active exception", SIGABRT) after the worker saved its record,
            # and the port picked by free_port() can be taken before gloo binds it: a record
            # from every rank is the work done; without them, try once more on a fresh port.
            if all(os.path.exists(f"{results}.{rank}") for rank in range(WORLD)):
                break
            if attempt == 1:
                raise
    records = [torch.load(f"{results}.{rank}") for rank in range(WORLD)]
    for rank, record in enumerate(records):
        assert "failure" not in record, f"rank {rank}:\n{record['failure']}"
    return records


def single_process():
    torch.manual_seed(0)
    return Model(use_attnc=True)


def test_ddp_forward_equals_one_process_on_the_whole_batch(ranks):
    tokens, _ = synthetic_batch(0)
    with torch.no_grad():
        expected = single_process()(tokens)
    got = torch.cat([record["logits"] for record in ranks])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()


def test_ddp_gradients_equal_one_process_on_the_whole_batch(ranks):
    tokens, targets = synthetic_batch(0)
    model = single_process()
    loss_of(model(tokens), targets).backward()
    for name, p in model.named_parameters():
        for record in ranks:
            got = record["grads"][name]
            error = (got - p.grad).norm() / p.grad.norm().clamp_min(1e-30)
            assert error <= 1e-5, (name, float(error))
