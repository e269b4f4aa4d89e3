"""Where the workflow's jobs run: threads of the Snakemake process, or worker processes.

Every job runs inside the Snakemake process (``run_script`` in ``rules/common.smk``); a new
interpreter per job would import numpy and astropy again, 0.6-1 s a job. The frame jobs
(calibrate and publish batches) of all but the smallest nights run better still in a
:class:`WorkerPool`, one worker process per core: as threads they share one interpreter with
each other and with Snakemake's scheduler (the GIL, the allocator), which made a 300-frame
night of stacks on 2 cores about 6% slower (median 52 s against 49 s) and a night of 5,000
small frames twice as slow. The workers fork from a server that has imported numpy and
astropy once (see :data:`PRELOAD`), started in the background when the run starts, so a job
waits for none of that.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import runpy
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from imgproc.manifest import list_fits

#: ``workers: auto`` uses processes for a night of at least this many lights, or of this many
#: bytes of lights. The pool's start delays a run by about 0.25 s (a second of the other core);
#: what threads lose grows with the frames (3-4 ms a frame of header work, which holds the
#: GIL) and their pixels (about 2 ms a MB). Measured whole runs, processes against threads, on 2
#: cores: 20 lights of 16x16 0.18 s slower, 40 of 16x16 0.09 s slower, 20 of 1304x976 0.09 s
#: slower; 40 of 1304x976 0.06 s faster, 100 of 16x16 0.17 s, 40 of 2048x2048 0.3 s, 500 of
#: 16x16 1.2 s, 5,000 of 16x16 16 s (18 s against 34 s).
AUTO_MIN_LIGHTS = 64
AUTO_MIN_BYTES = 128 * 1024**2
MODES = ("auto", "processes", "threads")
#: Imported once by the server the workers fork from: the libraries (0.9 s), not imgproc itself
#: (0.1 s), which a worker imports from the Snakemake process's path (the server's may hold
#: another copy), and ``__main__``, the ``snakemake`` command a worker would import again.
PRELOAD = ["__main__", "numpy", "scipy.fft", "astropy.io.fits", "bottleneck", "threadpoolctl"]


#: Free heap memory a process keeps instead of returning it to the kernel (``M_TRIM_THRESHOLD``).
#: The Snakemake process's job threads each have an arena of their own, so it keeps little. A
#: worker runs one job at a time, and keeps enough for the frames of an aligned group held from
#: registering to combining (``publish.KEEP_FRAMES_SHARE`` of its budget): handed back to the
#: kernel after each stack, they were faulted in again for the next, which cost more kernel
#: time (sys 12-15 s against 9-10 s for a 300-frame night of stacks) than the reading it saved.
TRIM_THRESHOLD = 64 << 20
WORKER_TRIM_THRESHOLD = 512 << 20


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> None:
    """Let the C allocator reuse freed frame buffers instead of returning them to the kernel.

    In a thread, a job's frame-sized arrays come from a malloc arena of its own that hands freed
    memory straight back; every new 16 MB array was then page-faulted in again: 350,000 faults
    and 2-4 s of kernel time for 300 frames of 2048². With arrays up to 32 MiB served from the
    arenas and up to ``trim_threshold`` bytes of free memory kept in each, that is 47,000
    faults. glibc only; elsewhere nothing changes.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD


def _cancel_timers() -> None:
    """Cancel every pending ``threading.Timer`` of this process."""
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()


def cancel_timers_at_exit() -> None:
    """Cancel pending Timers when the interpreter exits, before it waits for them.

    Snakemake's job rate limiter re-arms a Timer of its timespan (10 minutes in
    profiles/default) on every scheduling round, and an exiting interpreter joins every
    non-daemon thread first: a run that ends any way but through the onsuccess and onerror hooks
    (Snakemake itself failing, a full disk) would wait for the last Timer. The hook runs where
    ``concurrent.futures`` registers its own, before those threads are joined.
    """
    threading._register_atexit(_cancel_timers)  # type: ignore[attr-defined]


def use_processes(mode: str, cores: int, light_dir: str | os.PathLike[str]) -> bool:
    """Whether frame jobs get worker processes: ``mode`` is the config's ``workers`` value;
    ``auto`` means yes with two cores or more and at least :data:`AUTO_MIN_LIGHTS` lights or
    :data:`AUTO_MIN_BYTES` of them."""
    if mode not in MODES:
        raise ValueError(f"workers must be one of {MODES}, got {mode!r}")
    if mode != "auto" or cores < 2:
        return mode == "processes" and cores >= 2
    paths = list_fits(Path(light_dir))
    if len(paths) >= AUTO_MIN_LIGHTS:
        return True
    total = 0
    for path in paths:
        total += path.stat().st_size if path.is_file() else 0  # not a dangling link, a FIFO...
        if total >= AUTO_MIN_BYTES:
            return True
    return False


class JobArgs(list):
    """A picklable copy of a Snakemake ``Namedlist`` (a job's input, output, params or log):
    items by index, named items as attributes, file names as plain strings."""

    def __init__(self, items: Iterable[Any], names: Mapping[str, Any]) -> None:
        super().__init__(items)
        self.__dict__.update(names)

    @classmethod
    def of(cls, named: Any) -> JobArgs:
        """Copy of ``named`` (a Namedlist, or any list with an ``items()`` of its names)."""
        return cls([_plain(v) for v in named], {name: _plain(v) for name, v in named.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, str):
        return str(value)  # a Snakemake file name carries its rule and workflow
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def job_namespace(config: Mapping[str, Any], threads: int, **named: Any) -> SimpleNamespace:
    """The ``snakemake`` object an adapter script gets, picklable: ``config``, ``threads`` and
    each of ``named`` (input, output, params, log) as :class:`JobArgs`."""
    files = {key: JobArgs.of(value) for key, value in named.items()}
    return SimpleNamespace(config=dict(config), threads=threads, **files)


def run_adapter(script: str, snakemake: SimpleNamespace, cwd: str | None = None) -> None:
    """Run the adapter ``script`` with ``snakemake`` as its global of that name, in ``cwd``;
    then give the memory the job freed back to the kernel (:func:`release_freed_memory`)."""
    if cwd is not None and os.getcwd() != cwd:
        os.chdir(cwd)
    try:
        runpy.run_path(script, init_globals={"snakemake": snakemake})
    finally:
        release_freed_memory()


def release_freed_memory() -> None:
    """Return the free memory of every malloc arena to the kernel (glibc's ``malloc_trim``).

    Within a job, freed frame buffers are kept for the next frame (:func:`keep_freed_memory`);
    between jobs they would stay with the process at its high-water mark: a worker of a night of
    61-megapixel frames held 750 MB after its calibrations, 115 MB once trimmed. The next job
    faults its working set in once (about 30 ms for a batch of 2048² frames). glibc only.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _start_worker(memory_share: float) -> None:
    from imgproc.stack import MEMORY  # here: numpy and astropy would slow every Snakemake start

    # Ctrl-C reaches the whole process group: the Snakemake process decides what stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory(WORKER_TRIM_THRESHOLD)
    MEMORY.share = memory_share
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()


def _exit_when_orphaned() -> None:
    """End this worker as soon as the process that started it (Snakemake's) has ended or been
    killed (``imgproc`` kills it on Ctrl-C): an idle worker would otherwise wait for work
    forever, and a busy one go on writing for a run that is over."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)


def _ready() -> int:
    return os.getpid()


class WorkerPool:
    """``workers`` processes for frame jobs, each allowed ``1 / workers`` of the stacking memory
    budget (:data:`imgproc.stack.MEMORY`), so that together they keep the budget a single
    process of threads keeps.

    A worker that dies (killed for memory, a crash in a library) fails the jobs it and the
    other workers were running, with a message saying so, and the next job gets new workers.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(PRELOAD)
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_start_worker, initargs=(1 / self.workers,)
                )
            return self._pool

    def start(self) -> threading.Thread:
        """Start the server and the workers in a background thread (it takes about a second of
        one core: an interpreter importing numpy and astropy); returns the thread."""

        def warm() -> None:
            pool = self._executor()
            try:
                for future in [pool.submit(_ready) for _ in range(self.workers)]:
                    future.result()
            except BrokenProcessPool:  # the first job will say so
                pass

        thread = threading.Thread(target=warm, name="imgproc-workers", daemon=True)
        thread.start()
        return thread

    def run(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        """``fn(*args)`` in a worker; its exception is raised here."""
        pool = self._executor()
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                "a worker process died while running this job (out of memory?); rerun to finish the night"
            ) from exc

    def close(self) -> None:
        """Stop the workers (they finish nothing more)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
