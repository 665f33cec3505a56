"""Gloo aborts a process at exit: "terminate called without an active exception", SIGABRT.

Plain torch.distributed, Gloo, 2 processes on this machine, Linux. Each trial starts two fresh
processes that do what the end of a training script does: one all_reduce on a tensor made in
Python, then destroy_process_group(), then a normal interpreter exit. This process counts the
trials in which one of them died of SIGABRT.

    python tools/exit_abort/repro.py                      # 20 trials: all abort
    python tools/exit_abort/repro.py --fix release        # the fix: none does
    python tools/exit_abort/repro.py --natural --runs 50  # no help from the scheduler: rarely

How it happens (FINDINGS.md has the backtrace):
  1. A Gloo worker thread marks the all_reduce complete, which wakes the caller, and drops its own
     reference to the Work a moment later, at the end of its loop iteration. When that is the last
     reference, ~AsyncAllreduceWork releases the tensor, and releasing a tensor that has a Python
     object takes the GIL (TensorImpl::decref_pyobject -> gil_scoped_acquire), unless
     Py_IsInitialized() already says no (then it leaks it).
  2. destroy_process_group() does not stop Gloo's threads while anything else still references
     the group. torch.distributed.nn, first imported after init_process_group (DDP's constructor
     imports it, through torch._dynamo), keeps the default group in its functions' default
     arguments; a DDP model still alive holds it too.
  3. If the thread started waiting for the GIL before the main thread set the interpreter
     finalizing, it gets the GIL during finalization, and Python 3.11's take_gil() ends it with
     pthread_exit(); the forced unwind meets a noexcept frame and std::terminate() aborts.

Unless --natural, the trials make step 3 happen every time, as a busy machine does now and then:
each process keeps to one CPU, where Gloo's worker threads have SCHED_IDLE (they run only while
their main thread waits), and a thread waiting for the GIL asks for it after 1 s instead of 5 ms.
The last atexit handler gives the threads their CPUs back and holds the GIL 20 ms: a thread that
still has a tensor to release then waits for the GIL as the interpreter starts finalizing.

--fix release: nothing but the group's own table references it when destroy_process_group() runs
(torch.distributed.nn imported before init_process_group), so the group is destroyed there, and
~ProcessGroupGloo joins its threads (the GIL released), after they let go of every tensor.
"""
import atexit
import os
import sys
import time

GLOO_THREADS = []  # this process's Gloo worker threads, while they are kept from running


def run_gloo_threads_late():
    """The last atexit handler (registered before torch's), the last Python code before the
    interpreter starts finalizing: Gloo's threads run again, and wait for the GIL held here."""
    if not GLOO_THREADS:
        return
    cpus = set(range(os.cpu_count() or 1))
    for tid in GLOO_THREADS:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.sched_setaffinity(tid, cpus)
        except OSError:  # gone: destroy_process_group() joined it
            pass
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:  # 20 ms for them to run, the GIL held
        pass


atexit.register(run_gloo_threads_late)  # registered first, run last

import argparse  # noqa: E402  (after the registration above: torch registers handlers too)
import importlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

FIXES = {
    "none": "nothing: all_reduce, destroy_process_group(), exit",
    "barrier": "dist.barrier() before destroy_process_group()",
    "sleep": "time.sleep(0.1) before destroy_process_group()",
    "release": "no other reference to the group: destroy_process_group() joins Gloo's threads",
}


def hold_back_gloo_threads(before: set):
    """SCHED_IDLE for the threads init_process_group made, but its network loop and the store's:
    Gloo's worker threads (named pt_gloo_runloop once they ran, "python" before)."""
    for tid in {int(t) for t in os.listdir("/proc/self/task")} - before:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() not in ("gloo_tcp_loop", "pt_tcpstore_uv"):
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                    GLOO_THREADS.append(tid)
        except OSError:  # a thread that ended meanwhile
            pass


def one_process(rank: int, port: int, args):
    """The end of a training script, as one of 2 ranks. Returns normally: the interpreter's own
    shutdown follows, where the abort happens."""
    if args.fix == "release":
        # Imported before init_process_group, its default arguments hold None, not the group.
        importlib.import_module("torch.distributed.nn")
    if args.starve:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})  # the threads made next inherit it
        sys.setswitchinterval(1.0)
    before = {int(t) for t in os.listdir("/proc/self/task")}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    if args.starve:
        hold_back_gloo_threads(before)
    if args.fix != "release":
        # What DDP(model) does when it is first built (it imports torch._dynamo, which imports
        # torch.distributed.nn): functions with `group=group.WORLD` as a default argument now
        # hold the default group, past destroy_process_group().
        importlib.import_module("torch.distributed.nn")
    t = torch.ones(args.numel)  # made in Python: it has a Python object
    dist.all_reduce(t)
    if args.fix == "barrier":
        dist.barrier()
    elif args.fix == "sleep":
        time.sleep(0.1)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial(args) -> list:
    """Start 2 fresh processes that run one_process and exit; return their exit codes."""
    port = str(free_port())
    flags = ["--fix", args.fix, "--numel", str(args.numel)] + ([] if args.starve else ["--natural"])
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--port", port,
                               *flags]) for rank in range(2)]
    return [p.wait() for p in procs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="trials (default 20)")
    parser.add_argument("--fix", choices=list(FIXES), default="none",
                        help="; ".join(f"{k}: {v}" for k, v in FIXES.items()))
    parser.add_argument("--natural", dest="starve", action="store_false",
                        help="leave the scheduling alone: an abort only as often as the load makes")
    parser.add_argument("--numel", type=int, default=1000, help="elements of the tensor (1000)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # one of a trial's processes
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        one_process(args.rank, args.port, args)
        return  # and on through the interpreter's finalization
    if args.runs < 1 or args.numel < 1:
        parser.error("--runs and --numel must be at least 1")
    if not sys.platform.startswith("linux"):
        raise SystemExit("error: Linux only (SCHED_IDLE, /proc)")
    how = "Gloo threads held back (SCHED_IDLE)" if args.starve else "natural scheduling"
    print(f"torch {torch.__version__} | Python {sys.version.split()[0]} | fix: {FIXES[args.fix]} | "
          f"{how}", flush=True)
    aborted = failed = 0
    start = time.perf_counter()
    for _ in range(args.runs):
        codes = trial(args)
        if -signal.SIGABRT in codes:
            aborted += 1
        elif any(codes):
            failed += 1
    print(f"{aborted} of {args.runs} trials aborted (SIGABRT), {failed} failed otherwise | "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(1 if aborted or failed else 0)


if __name__ == "__main__":
    main()
