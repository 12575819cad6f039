"""The main loop of a worker process: ``python -m engine.executor.worker_main SPEC_JSON``.

The engine starts it (engine/executor/worker_handle.py). It loads the model, says Ready,
joins the torch.distributed world when asked, then runs what arrives on its command ring
in order (tasks, frees, world changes) with the same ``Worker`` class the in-process
executor uses, and answers on its result ring. It blocks on an eventfd while idle.

It outlives neither the engine (a thread watches a pipe whose write end only the engine
holds and exits the process on EOF) nor a Ctrl-C of the engine: it ignores SIGINT, which a
terminal sends to the whole process group, and leaves when the engine says so or dies.

A worker whose task left it unfit to go on (``Worker.fatal``: a sticky CUDA error, or a
failed multi-rank task whose collectives may be out of step) says why (``Leaving``)
instead of answering that task, aborts its process group and exits with
``EXIT_REPLACE_ME``; the engine replaces it and forms a new world, as after any other
death, and the task's requests start over.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading

from engine.executor.protocol import (
    EXIT_REPLACE_ME,
    FromWorker,
    Joined,
    JoinFailed,
    JoinWorld,
    Leaving,
    Ready,
    Shutdown,
    StartFailed,
    WorkerSpec,
    decode_spec,
    encoder,
    to_worker_decoder,
)
from engine.executor.shm_queue import RingReader, RingWriter, ShmRing

logger = logging.getLogger("engine.executor.worker_main")


class Channel:
    """The worker's two rings: commands in, results out (blocking when the ring is full)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.reader = RingReader(ShmRing.attach(spec.cmd_fds, spec.ring_capacity))
        self.writer = RingWriter(ShmRing.attach(spec.out_fds, spec.ring_capacity))

    def send(self, message: FromWorker) -> None:
        self.writer.write(encoder.encode(message))

    def receive(self) -> list:
        """Block until the engine has sent something; return every message so far."""
        self.reader.wait()
        return self.reader.drain(to_worker_decoder.decode)


def watch_parent(fd: int) -> None:
    """Exit at once when the engine process is gone, whatever the main thread is doing."""

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        finally:
            os._exit(3)

    threading.Thread(target=watch, name="gfdit-parent-watch", daemon=True).start()


def load_worker(spec: WorkerSpec):
    import torch

    from engine.executor.allocator import keep_freed_memory

    keep_freed_memory()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(spec.device)  # NCCL and stray allocations use this rank's GPU
    from engine.executor.worker import Worker
    from engine.messages import LoraCommand
    from engine.models.attention import resolve_attention_backend
    from engine.models.loader import load_adapter

    adapter = load_adapter(spec.model.model, spec.device, spec.model.dtype, spec.model.backend)
    backend = resolve_attention_backend(spec.model.attention_backend, adapter.device)
    worker = Worker(spec.rank, adapter, attention_backend=backend, compile=spec.model.compile)
    for index, (name, path) in enumerate(spec.loras):
        answer = worker.lora(LoraCommand(index, name, path))
        if answer.error:
            raise RuntimeError(f"LoRA adapter {name!r}: {answer.error}")
    if spec.worker_hook:
        module_name, _, function = spec.worker_hook.partition(":")
        getattr(importlib.import_module(module_name), function)(worker)
    return worker


def serve(spec: WorkerSpec, channel: Channel) -> int:
    from engine.executor.world import World
    from engine.messages import FreeRequests, LoraCommand, Task

    try:
        worker = load_worker(spec)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, not raised
        logger.exception("rank %d could not load the model", spec.rank)
        channel.send(StartFailed(f"worker {spec.rank} could not load model {spec.model.model!r}: "
                                 f"{type(exc).__name__}: {exc}"))
        return 1
    channel.send(Ready(worker.adapter.info(), os.getpid()))
    world = World(spec)
    while True:
        for message in channel.receive():
            if isinstance(message, Task):
                result = worker.execute(message)
                if worker.fatal is not None:
                    # No result: the engine treats the task as lost with this worker, so its
                    # requests start over (up to max_retries) on a sound one.
                    logger.error("rank %d leaves to be replaced: %s", spec.rank, worker.fatal)
                    channel.send(Leaving(worker.fatal))
                    world.leave(abort=True)
                    return EXIT_REPLACE_ME
                channel.send(result)
            elif isinstance(message, LoraCommand):
                channel.send(worker.lora(message))
            elif isinstance(message, FreeRequests):
                worker.free(message.request_ids)
            elif isinstance(message, JoinWorld):
                worker.set_collectives(None)
                try:
                    world.join(message.epoch, message.world_size, message.channels)
                except Exception as exc:  # noqa: BLE001 - the engine decides what to do
                    logger.exception("rank %d could not join world epoch %d", spec.rank, message.epoch)
                    channel.send(JoinFailed(message.epoch, f"{type(exc).__name__}: {exc}"))
                else:
                    worker.set_collectives(world.comm)
                    channel.send(Joined(message.epoch))
            elif isinstance(message, Shutdown):
                world.leave()
                return 0


def main(argv: list[str] | None = None) -> int:
    spec = decode_spec((argv or sys.argv)[1])
    watch_parent(spec.parent_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s gfdit-worker-{spec.rank} %(levelname)s %(name)s: %(message)s")
    return serve(spec, Channel(spec))


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown of torch and diffusers (seconds); nothing is left to save.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
