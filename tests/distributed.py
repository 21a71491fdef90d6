"""Run a function on N CPU processes joined in a gloo process group, for the multi-process tests.

``run_distributed(fn, world_size)`` starts ``world_size`` fresh processes (``spawn``), joins them in a
``torch.distributed`` gloo group with a timeout, calls ``fn(rank, world_size, *args)`` on each and returns the
ranks' results, index = rank. A rank that raises makes the parent raise the same exception, with a note naming the
rank and carrying the rank's traceback; a collective that one rank never reaches fails after ``timeout_s`` seconds
instead of hanging (gloo enforces the group's timeout), and the parent kills whatever is left after its own deadline.

``fn`` must be picklable by reference: a module-level function of a module the child can import (a test module
works: spawn hands the parent's ``sys.path`` to the child). Results travel pickled by value (tensors included).

Example::

    def _sum_ranks(rank, world_size):
        t = torch.tensor([float(rank)])
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_distributed(_sum_ranks, world_size=2) == [1.0, 1.0]
"""

import datetime
import multiprocessing
import os
import pickle
import queue
import tempfile
import time
import traceback

__all__ = ["run_distributed"]

# seconds a child may take to import torch/diffusers and join the group, on top of the group's timeout
_STARTUP_S = 120.0
# seconds the other ranks get to finish once one rank has raised (they may be blocked in a collective)
_GRACE_S = 5.0


def _cpu_device_count_patch():
    """diffusers 0.42 resolves a parallel model's device as ``rank % torch.accelerator.device_count()``
    (ModelMixin._resolve_parallel_config), which divides by zero on a CPU-only host where the count is 0. The CPU
    "accelerator" is one device, so the child reports 1 when no accelerator exists."""
    import torch

    if torch.accelerator.current_accelerator() is None and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def _child(rank, world_size, init_file, timeout_s, fn, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    _cpu_device_count_patch()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            payload = (rank, True, fn(rank, world_size, *args), None)
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent with its rank
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:  # an exception that does not pickle travels as a RuntimeError with its text
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        payload = (rank, False, exc, tb)
    results.put(pickle.dumps(payload))


def run_distributed(fn, world_size=2, args=(), timeout_s=90.0):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned CPU processes in one gloo process group.

    Args:
        fn: a module-level (picklable) function; it may use ``torch.distributed`` (the default group is
            initialised, backend gloo) and diffusers' ``enable_parallelism``.
        world_size: number of processes (ranks), >= 1.
        args: extra positional arguments for ``fn``, picklable.
        timeout_s: the process group's timeout in seconds: a collective not matched by every rank within it raises.

    Returns:
        list of the ranks' return values, index = rank.

    Raises:
        ValueError: ``world_size`` < 1 or ``timeout_s`` <= 0.
        The exception a rank raised (the lowest rank's when several did), with a note naming the rank and its
        traceback; ``TimeoutError`` when a rank returned nothing within ``timeout_s`` plus the start-up allowance;
        ``RuntimeError`` when a rank exited without a result (crashed).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_child, args=(r, world_size, init_file, timeout_s, fn, tuple(args), results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        received, deadline, first_error_at = {}, time.monotonic() + timeout_s + _STARTUP_S, None
        try:
            while len(received) < world_size:
                now = time.monotonic()
                if now > deadline or (first_error_at is not None and now > first_error_at + _GRACE_S):
                    break
                try:
                    rank, ok, value, tb = pickle.loads(results.get(timeout=0.2))
                except queue.Empty:
                    if any(not p.is_alive() and r not in received for r, p in enumerate(procs)):
                        # a rank exited: give its queued result a moment to arrive, then stop waiting for it
                        try:
                            rank, ok, value, tb = pickle.loads(results.get(timeout=2.0))
                        except queue.Empty:
                            break
                    else:
                        continue
                received[rank] = (ok, value, tb)
                if not ok and first_error_at is None:
                    first_error_at = time.monotonic()
        finally:
            for p in procs:
                p.join(timeout=1.0)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = sorted(r for r, (ok, _, _) in received.items() if not ok)
    if errors:
        rank = errors[0]
        _, exc, tb = received[rank]
        exc.add_note(f"raised on rank {rank} of {world_size}; the rank's traceback:\n{tb}")
        raise exc
    missing = [r for r in range(world_size) if r not in received]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} returned nothing within {timeout_s + _STARTUP_S:.0f} s")
        raise RuntimeError(f"ranks {missing} exited without a result (exit codes {codes})")
    return [received[r][1] for r in range(world_size)]
