"""Run a command with a time limit that really ends it: the tour, gpu-check, the notebooks and the
tests start steps this way.

torchrun starts its workers in sessions of their own, so killing torchrun alone leaves them
running (holding ports, memory and the GPU until their process-group timeout). Here the command
starts in a new session, and a command past its limit gets SIGTERM (torchrun then stops its
workers), then SIGKILL for every process of its session that is left.
"""
import os
import signal
import subprocess
import time

GRACE_S = 5  # between SIGTERM and SIGKILL


def run(cmd, cwd=None, env=None, timeout=None, merge_output=False) -> subprocess.CompletedProcess:
    """Run `cmd` (stdin closed), capture its output as text, return a CompletedProcess with one more
    attribute, `timed_out`. With merge_output, stderr goes into stdout: one text, in the order the
    lines were printed (stderr is then None). A command past `timeout` seconds is ended with its
    whole session, and returns with timed_out True and what it printed until then."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        end_session(proc)
        stdout, stderr = proc.communicate()
    except BaseException:  # Ctrl-C or a failing caller: leave nothing running
        end_session(proc)
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.timed_out = timed_out
    return done


def end_session(proc: subprocess.Popen):
    """SIGTERM to the command's session (torchrun then stops its workers itself), and after
    GRACE_S seconds SIGKILL to whatever is left: the session, and every descendant, since torchrun's
    workers run in sessions of their own."""
    family = descendants(proc.pid)  # before anyone exits: an orphan's parent is no longer known
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    for pid in [proc.pid, *family, *descendants(proc.pid)]:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass


def descendants(pid: int) -> list:
    """The processes under `pid` (Linux: from /proc; elsewhere none are known)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
