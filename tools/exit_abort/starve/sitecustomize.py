"""The exit abort on demand, for any script: put this folder on PYTHONPATH.

    PYTHONPATH=tools/exit_abort/starve python tools/count_aborts.py --runs 10 -- \\
        torchrun --standalone --nproc-per-node 2 {repo}/06_amp.py --max_epochs 1

Python imports this file first in every process (torchrun's workers, mp.spawn's children too).
It does to a real step what repro.py does to its 20 lines (see there and FINDINGS.md): after
init_process_group() each rank keeps to one CPU, the worker threads Gloo made get SCHED_IDLE (they
run only while their main thread waits) and a thread waiting for the GIL asks for it after 1 s,
not 5 ms; the last atexit handler gives the threads their CPUs back and holds the GIL 20 ms. A
Gloo thread that still has a tensor to release then waits for the GIL when the interpreter
starts finalizing, and takes the process down. A script whose destroy_process_group() joined
Gloo's threads has none left by then. Linux only.

EXIT_ABORT_STRICT=1 (how the tests use it): a Gloo thread still alive right after
destroy_process_group() (on a rank that is not failing) or at exit ends the process with exit code
86 and one line, every time, instead of the abort now and then.
"""
import atexit
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

TARGET = "torch.distributed.distributed_c10d"
GLOO_THREADS = []


def thread_names() -> dict:
    names = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names[int(tid)] = f.read().strip()
        except OSError:  # a thread that ended meanwhile
            pass
    return names


def starve(before: dict):
    """SCHED_IDLE for the threads init_process_group made but its network loop and the store's:
    Gloo's workers (named pt_gloo_runloop once they ran, "python" before)."""
    for tid, name in thread_names().items():
        if tid not in before and name not in ("gloo_tcp_loop", "pt_tcpstore_uv"):
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                GLOO_THREADS.append(tid)
            except OSError:
                pass


def fail_if_gloo_threads_run(when: str):
    """With EXIT_ABORT_STRICT=1 (the tests): a Gloo thread still alive now fails the process at
    once (exit 86, one line), whether or not it would have aborted: a certain failure, not a
    race."""
    alive = [tid for tid in GLOO_THREADS if os.path.exists(f"/proc/self/task/{tid}")]
    if alive and os.environ.get("EXIT_ABORT_STRICT") == "1":
        print(f"error: {len(alive)} Gloo worker thread(s) still running {when}: something still "
              f"holds the process group (a DDP model? torch.distributed.nn imported after init? "
              f"tools/exit_abort/FINDINGS.md)", file=sys.stderr, flush=True)
        os._exit(86)


def run_gloo_threads_late():
    """The last atexit handler: Gloo's threads run again and wait for the GIL this thread holds
    (strict: none may be left)."""
    if not GLOO_THREADS:
        return
    fail_if_gloo_threads_run("at exit")
    cpus = set(range(os.cpu_count() or 1))
    for tid in GLOO_THREADS:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.sched_setaffinity(tid, cpus)
        except OSError:  # gone: destroy_process_group() joined it
            pass
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        pass


class StarveAfterInit(importlib.abc.MetaPathFinder):
    """Wraps init_process_group as torch.distributed's module is loaded (before `torch.distributed`
    copies it with `from .distributed_c10d import *`)."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            init = module.init_process_group

            @functools.wraps(init)
            def init_process_group(*args, **kwargs):
                rank = int(kwargs.get("rank", os.environ.get("RANK", os.getpid())))
                cpus = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(0, {cpus[rank % len(cpus)]})  # Gloo's threads inherit it
                sys.setswitchinterval(1.0)
                before = thread_names()
                init(*args, **kwargs)
                starve(before)

            module.init_process_group = init_process_group
            destroy = module.destroy_process_group

            @functools.wraps(destroy)
            def destroy_process_group(*args, **kwargs):
                destroy(*args, **kwargs)
                # On a rank that is not failing, once the default group is gone, its Gloo threads
                # must be joined (joined later, say as the model is freed, they are the deadlock
                # of FINDINGS.md waiting to happen).
                if sys.exc_info()[0] is None and not args and kwargs.get("group") is None:
                    fail_if_gloo_threads_run("after destroy_process_group()")

            module.destroy_process_group = destroy_process_group

        spec.loader.exec_module = exec_module
        return spec


if sys.platform.startswith("linux"):
    atexit.register(run_gloo_threads_late)  # registered first, run last
    sys.meta_path.insert(0, StarveAfterInit())
