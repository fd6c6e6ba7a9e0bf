"""Threads and asyncio tasks: per-call state (the forced backend) and the cached index plans are
safe to share; concurrent runs give the results of the same runs alone."""
import asyncio
import copy
import threading

import timm
import torch

from timm_nat.attention import backends, na2d, select_backend, use_backend
from timm_nat.attention.reference import na2d_reference

from conftest import tiny_kwargs


def _record_runs(monkeypatch):
    """Wrap every backend's ``run`` to log ``(thread, backend)``."""
    log = []
    for name, backend in backends.BACKENDS.items():
        def run(*args, _name=name, _run=backend.run):
            log.append((threading.get_ident(), _name))
            return _run(*args)
        monkeypatch.setattr(backend, "run", run)
    return log


def test_threads_keep_their_own_use_backend_blocks(monkeypatch):
    """All threads are inside their blocks at once (barrier); each runs only its own backend."""
    log = _record_runs(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 10, 11, 2, 8, generator=gen) for _ in range(3))
    expected = na2d_reference(q, k, v, (3, 3), (2, 1), None, 8 ** -0.5)
    wanted = {"tiled": "tiled", "reference": "reference", "natten": "natten", None: "cpu_fused"}  # None: automatic
    barrier = threading.Barrier(len(wanted))
    seen, errors = {}, []

    def work(name):
        try:
            with use_backend(name):
                barrier.wait()
                for _ in range(3):
                    out = na2d(q, k, v, 3, dilation=(2, 1))
                    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
                    seen.setdefault(threading.get_ident(), set()).add(select_backend("cpu", has_rpb=False))
                barrier.wait()
            ran = {b for t, b in log if t == threading.get_ident()}
            assert ran == {wanted[name]} and seen[threading.get_ident()] == {wanted[name]}, (name, ran)
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(name,)) for name in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert select_backend("cpu", has_rpb=True) == "cpu_fused"  # nothing left forced here


def test_asyncio_tasks_keep_their_own_use_backend_blocks():
    async def task(name, started, results):
        with use_backend(name):
            started.append(name)
            while len(started) < 2:  # both blocks open at once
                await asyncio.sleep(0)
            results[name] = select_backend("cpu", has_rpb=True)
            await asyncio.sleep(0)
            results[name] += "," + select_backend("cpu", has_rpb=True)

    async def main():
        started, results = [], {}
        with use_backend("tiled"):
            await asyncio.gather(task("reference", started, results), task("flex", started, results))
            results["outer"] = select_backend("cpu", has_rpb=True)
        return results

    assert asyncio.run(main()) == {"reference": "reference,reference", "flex": "flex,flex", "outer": "tiled"}


def _tiny_model():
    torch.manual_seed(0)
    return timm.create_model("dinat_mini", num_classes=5, **tiny_kwargs("dinat_mini", kernel_size=3))


def _train(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    with use_backend("tiled"):
        return _steps(model, optimizer, batches)


def _steps(model, optimizer, batches):
    for x in batches:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _infer(model, batches):
    model.eval()
    with torch.inference_mode(), use_backend("tiled"):  # tiled's plans built in inference mode; training: automatic
        return [model(x) for x in batches]


def test_concurrent_training_and_inference_match_running_alone():
    """Inference (under inference_mode) at the training size while training runs, both on tiled
    and filling its shared plan cache together: the same weights and outputs as alone."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(2)]
    model = _tiny_model()
    alone_weights = _train(copy.deepcopy(model), batches)
    alone_outputs = _infer(copy.deepcopy(model), batches)

    results, errors = {}, []

    def run(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)

    from timm_nat.attention import tiled
    tiled.grid_plan.cache_clear()  # both threads fill the plan cache for the first time, together
    threads = [threading.Thread(target=run, args=("train", _train, copy.deepcopy(model), batches)),
               threading.Thread(target=run, args=("infer", _infer, copy.deepcopy(model), batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for ours, alone in zip(results["train"], alone_weights):
        torch.testing.assert_close(ours, alone, rtol=0, atol=0)
    for ours, alone in zip(results["infer"], alone_outputs):
        torch.testing.assert_close(ours, alone, rtol=0, atol=0)
