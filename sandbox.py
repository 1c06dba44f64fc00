"""sandbox.py -- run model-written Python, contained, in a few milliseconds.

Contract (model.py, evaluate.py and the tests rely on exactly this):
  run_cells(cells, timeout=5.0, memory_mb=1024, ...) -> Result(output, ok, error)
      Runs the code blocks of one solution in order, like notebook cells: later blocks see
      names defined by earlier ones. `output` is what the LAST block printed (stdout and
      stderr, head + tail kept past `max_output` bytes); if the last block ends in a bare
      expression its value is printed, as in a notebook. `ok` means the last block finished
      without exception, timeout or crash; `error` is one short line or None. An earlier
      block's exception, exit() or sys.exit() ends that block only. A block that times out
      resets the state: later blocks run in a fresh interpreter and their output starts with
      a note saying so. A bad limit (timeout nan, inf, 0, over 600 s; a non-positive
      memory_mb, ...) raises ValueError before anything runs.
  run_batch(list_of_cell_lists, workers=os.cpu_count(), ...) -> list[Result], order kept.
  python sandbox.py -c "print(1+1)"         # a quick manual try
  python sandbox.py --selftest              # measure, from inside a sandbox, each protection

How it works. A pool of pre-warmed zygotes (Z) is started once, with a scrubbed environment
and numpy + sympy imported. Z never reads a request: it only forks, ahead of time,
  G  a supervisor (outside every namespace) that builds one sandbox, then reads ONE request
     itself from Z's stdin, watches it, writes the result to Z's stdout and cleans up. Z forks
     the next G as soon as this one has taken its request, so the next sandbox is built while
     this one runs, and no request's cells or output ever sit in Z's memory: request N+1 is a
     fork of a process that never saw request N (nor, in run_batch, any other rollout).
  R  PID 1 of a new PID namespace; it enters new mount, network, IPC, UTS and cgroup
     namespaces, joins a fresh per-sandbox cgroup (memory and process count for the whole
     sandbox), remounts every filesystem read-only, nodev and nosuid, mounts a fresh /proc
     (read-only), a minimal /dev (null zero full random urandom, a private shm), an empty /run
     and a private tmpfs on an empty scratch directory, and forks
  W  the worker: a new user namespace, created as a host uid of its own (drawn at random from
     HOST_UID_RANGE: what the cell holds counts against that uid's host-wide quotas, not
     root's nor another rollout's), in which it is uid/gid 65534 with no
     capabilities at all (empty bounding set), no_new_privs, a fresh session keyring, a seccomp
     filter (no new namespaces, mounts, inotify or fanotify, file locks or key calls:
     SECCOMP_SYSCALLS says why), its own session, resource limits, cwd = HOME = TMPDIR = the
     scratch tmpfs, stdin empty; it runs the cells.

What decides a result. The verdict travels on pipes the cell never holds: R (root outside,
PID 1, which W's uid cannot signal) reports how W ended (waitpid), G reads that and keeps its
own clock. W also reports which cell it is in and the last cell's exception; the cell can
write to that pipe too, so G treats it as untrusted text: a line must be short, well formed,
and a cell index counts only if it is an integer above the previous one and below the cell
count. A forged report can therefore only blame another cell or make the result worse: the
per-cell deadline restarts at most once per cell and never past SETUP_SLACK + cells x timeout,
"finished" means W's exit status seen by R, and anything malformed marks the result failed.
The caller (run_cells) keeps a deadline of its own (cells x timeout + CLIENT_GRACE): if no
answer with the request's random id comes by then it kills the zygote's process group and
every process left in its cgroups, and starts a fresh one. Cleanup (kill the namespace and
everything in the cgroup, remove the scratch directory and the cgroup) runs in `finally`.

Limits (flags of run_cells / run_batch; defaults in brackets):
  timeout       wall-clock seconds per cell, in (0, 600] [5.0]
  memory_mb     per process (RLIMIT_AS: a huge allocation raises MemoryError) and, where a
                memory cgroup is available, for the whole sandbox (the kernel kills one of its
                processes past it) [1024]
  max_output    bytes of output kept, head + tail with a marker [20000]
  file_mb       largest file a cell may write (RLIMIT_FSIZE) [16]
  max_files     open file descriptors (RLIMIT_NOFILE) [64]
  max_procs     processes and threads of the whole sandbox: a pids cgroup where available, and
                RLIMIT_NPROC, which counts only this sandbox in its own user namespace [64]
  tmpfs_mb      size of the private scratch tmpfs [64]
  real-time signals queued at once SIGPENDING_MAX [64] (a standard signal pends once per
                process and thread besides); no POSIX message queues, no locked memory
  Python's int-to-str digit limit is lifted, so huge integers print.

Cgroups: v2 where the zygote's cgroup delegates memory and pids, else v1 memory and pids
hierarchies (as on the machine this was written on), else none. One cgroup per request,
created before and removed after it (a reused one kept the pid counts of torn-down
namespaces for a while, so a busy pool hit its limit spuriously). Without cgroups the only
bounds are the per-process RLIMIT_AS and RLIMIT_NPROC.

FALLBACK. Isolation needs root (CAP_SYS_ADMIN) and namespaces. AUTOCODE_SANDBOX_NAMESPACES=0,
or a machine that does not allow them, gives the fallback. As root it is refused (run_cells
raises RuntimeError) unless AUTOCODE_SANDBOX_ROOT_FALLBACK=1, which the tests set. Cells then
run as their sandbox's drawn host uid (as in the namespaced mode), with no capabilities, where
users other than root may enter the interpreter's directories; where they may not (a pyenv
under /root, mode 700: an unprivileged cell could import nothing new), as uid 0 with every
capability dropped, which still owns root's files (FALLBACK_GAPS says what that lets a cell
do). AUTOCODE_SANDBOX_FALLBACK_UID=1 takes the drawn uid there too (cells then import only what
the zygote imported and what other users can read), =0 keeps uid 0. The fallback still does:
a scrubbed environment, a fresh session keyring, no capabilities, no_new_privs, the seccomp
filter, resource limits, a supervisor that is a child subreaper and kills every descendant of
the request (setsid or setpgid children too) plus everything in its cgroup (cgroups only as
root), a scratch directory removed afterwards (remove_scratch), the sandbox's own processes
non-dumpable (their /proc/<pid>/mem, environ and fd are closed to the cell), the same
untrusted-report rules and the caller's deadline. FALLBACK_GAPS lists what it does NOT protect; `--selftest` prints it.

Never protected against, in either mode: reading world-readable files (keep secrets off the
machine that runs rollouts, or at least not world-readable), a unix socket that any user may
write to, CPU contention with the host, kernel exploits. A host process running as a uid in
HOST_UID_RANGE (nothing else should) could signal and trace cells that drew it. In a container
whose user namespace does not map HOST_UID_RANGE, every cell is host uid 65534: rollouts that
run at once then share that uid's quotas (a cell holding them can make another's fd passing,
epoll or timers fail), and other processes of uid 65534 may signal and trace cells. Where the
cells' namespace cannot be created without root (unprivileged user namespaces off, confined by
AppArmor, or AUTOCODE_SANDBOX_USERNS_AS_ROOT=1), root creates it and pending standard signals
count against root's limit. The seccomp filter exists on x86_64 and aarch64, in both modes;
elsewhere --selftest says it is off. It is a guard for model-written math code, not a proof
against a determined attacker.
"""
import argparse
import ast
import atexit
import ctypes
import errno
import gc
import json
import math
import os
import platform
import pwd
import queue
import re
import resource
import secrets
import select
import selectors
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULTS = dict(timeout=5.0, memory_mb=1024, max_output=20000, file_mb=16, max_files=64,
                max_procs=64, tmpfs_mb=64)
MAX_TIMEOUT = 600.0          # seconds per cell: past this a "timeout" is a bug, not a limit
SIGPENDING_MAX = 64         # queued signals a sandbox may have pending at once
SETUP_SLACK = 0.5            # G's allowance for W to receive its request and start cell 1
CLIENT_GRACE = 2.0           # the caller's deadline: cells x timeout + this
SANDBOX_ID = 65534           # uid and gid of the cell inside its user namespace ("nobody")
# the cells' host uids, one drawn per sandbox: above systemd-nspawn's container pool (to
# 0x6FFFFFFF) and SSSD's default range for directory users (to 2,000,200,000), below systemd's
# "foreign" range (0x7FFE0000, images' files); a uid the host's user database knows is skipped
HOST_UID_RANGE = (0x77400000, 0x7FFE0000)
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
SCRATCH_PARENT = "/tmp"      # scratch dirs: autocode-sandbox-<zygote pid>-*
TAG = "AUTOCODE_SANDBOX_TAG"  # in every sandbox process's environment: the caller's pid
FALLBACK_GAPS = (
    "no PID namespace: the cell sees every process and can signal the caller, the zygote and "
    "its supervisors (same user); one it kills cannot clean up, and its children may then survive",
    "no mount namespace: writes anywhere the user can write, including /proc/sys when that user is root",
    "no network namespace: full network access",
    "no IPC or UTS namespace: SysV shared memory and the hostname are the host's",
    "the user's keyring (@u) is shared with the host (the session keyring is fresh)",
    "reads the environment and memory of the user's other processes, the caller included "
    "(only the sandbox's own processes are non-dumpable)",
    "device nodes the user may open stay writable",
    "without root no cgroup: memory is bounded per process and RLIMIT_NPROC counts every process of the user",
    "as root where other users cannot enter the interpreter's directories (or AUTOCODE_SANDBOX_FALLBACK_UID=0): "
    "cells are uid 0 without capabilities, which owns root's files: a cell can write them, lift its cgroup's "
    "limits or leave the cgroup (RLIMIT_NPROC does not bind uid 0), and write into another rollout's processes",
    "as root with a drawn uid, where this process's user namespace does not map HOST_UID_RANGE: every cell is "
    "uid 65534, so rollouts that run at once can signal, trace and write into each other's processes",
)
# imported in the zygote so cells get them for free (forked, not loaded)
WARM_IMPORTS = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
                "statistics", "random", "re", "string", "heapq", "bisect", "operator", "datetime",
                "numpy", "sympy")
# run once in the zygote, so the lazy imports and caches behind common calls are already
# in memory when a worker is forked (a first sympy.factorint costs ~1 ms and more imports)
WARM_UP = """
import numpy as np, sympy as sp
x = sp.symbols('x')
sp.factorint(2**64 - 1); sp.isprime(97); sp.primerange(2, 50); sp.gcd(12, 18); sp.binomial(10, 3)
sp.solve(x**2 - 4, x); sp.simplify(sp.sin(x)**2 + sp.cos(x)**2); sp.expand((x + 1)**3); sp.factor(x**2 - 1)
sp.Rational(1, 3) + sp.sqrt(8); sp.N(sp.pi, 20); sp.latex(x**2)
np.arange(10).sum(); np.linalg.solve(np.eye(2), np.ones(2))
"""


@dataclass
class Result:
    output: str
    ok: bool
    error: str | None = None


class SandboxRefused(RuntimeError):
    """Root without namespaces, and no AUTOCODE_SANDBOX_ROOT_FALLBACK=1."""


# ---------------------------------------------------------------------------------------
# Linux plumbing (ctypes: Python 3.11 has no os.unshare / os.mount)
# ---------------------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 8192, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 36, 38
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(platform.machine())
KEYCTL_JOIN_SESSION_KEYRING = 1
HARMLESS_DEVICES = ("null", "zero", "full", "random", "urandom")
# the supervisors ignore these, so a cell that shares their uid (the fallback) cannot end them
# with anything but SIGKILL; W restores the defaults before any cell runs
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTSTP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGVTALRM, signal.SIGPROF)
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _drop_capabilities():
    """No capabilities at all, now or after an exec (empty bounding set), and no_new_privs."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break                                      # past the last cap, or not allowed (non-root)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3, this pid
    data = (ctypes.c_uint32 * 6)()                     # effective/permitted/inheritable = 0
    _check(_libc.capset(header, data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


# seccomp: the system calls a cell may not make, by architecture. Whatever a cell creates in
# its user namespace is also charged, host-wide, to the uid that created that namespace (root,
# until _become_nobody made it the sandbox's own host uid). Attacks used that (README, Sandbox):
#  - namespaces (unshare, setns, clone with a CLONE_NEW* flag) and mounts: a cell kept ~96k
#    UTS namespaces alive, each pinned by a bind mount (no fd or process limit bounds that),
#    and every other sandbox, and root, failed to create one;
#  - inotify and fanotify: 128 instances, or 192k watches on files of its scratch tmpfs, and
#    root's (and every sandbox's) inotify failed.
# Also refused: flock and fcntl's record locks (a read-only mount does not stop a lock, and a
# cell held locks on host files others wait for: torch's compile cache, SQLite databases),
# and the key calls (when every sandbox was host uid 65534, one cell filled the key quota of
# all of them; the fresh session keyring is joined before the filter). clone3 passes its flags in
# memory a filter cannot read: it gets ENOSYS and the C library falls back to clone.
SECCOMP_SYSCALLS = {
    "x86_64": (0xC000003E, dict(unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, open_tree=428,
                                move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
                                mount_setattr=442, open_tree_attr=467, inotify_init=253, inotify_init1=294,
                                inotify_add_watch=254, fanotify_init=300, fanotify_mark=301, flock=73,
                                add_key=248, request_key=249, keyctl=250), 56, 435, 72),
    "aarch64": (0xC00000B7, dict(unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, open_tree=428,
                                 move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
                                 mount_setattr=442, open_tree_attr=467, inotify_init1=26, inotify_add_watch=27,
                                 fanotify_init=262, fanotify_mark=263, flock=32, add_key=217, request_key=218,
                                 keyctl=219), 220, 435, 25),
}.get(platform.machine())          # (audit arch, refused calls, clone, clone3, fcntl); None: no filter
CLONE_NEW_ANY = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
FCNTL_LOCKS = (6, 7, 37, 38)          # F_SETLK F_SETLKW F_OFD_SETLK F_OFD_SETLKW
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def _seccomp_program():
    """The filter, as classic BPF instructions (code, jump if true, jump if false, k); jumps
    count the instructions skipped. Calls of another ABI (i386 from a 64-bit process, x32
    numbers) get ENOSYS, whatever they are."""
    arch, refused, clone, clone3, fcntl = SECCOMP_SYSCALLS
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    eperm = 6 + len(refused) + 7 + len(FCNTL_LOCKS)    # where the three returns at the end sit
    allow, enosys = eperm + 1, eperm + 2
    jump = lambda prog, target: target - len(prog) - 1           # from the instruction appended next
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ENOSYS),         # seccomp_data.arch
            (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, ENOSYS)]   # .nr (x32 bit: refused)
    for nr in refused.values():
        prog.append((JEQ, jump(prog, eperm), 0, nr))
    prog.append((JEQ, jump(prog, enosys), 0, clone3))
    prog.append((JEQ, jump(prog, eperm - 2), 0, clone))                    # to the clone check below
    prog.append((JEQ, 0, jump(prog, allow), fcntl))
    prog.append((LD, 0, 0, 24))                                           # fcntl's command
    for cmd in FCNTL_LOCKS:
        prog.append((JEQ, jump(prog, eperm), 0, cmd))
    prog.append((RET, 0, 0, ALLOW))
    prog.append((LD, 0, 0, 16))                                           # clone's flags (low 32 bits)
    prog.append((JSET, jump(prog, eperm), jump(prog, allow), CLONE_NEW_ANY))
    prog += [(RET, 0, 0, EPERM), (RET, 0, 0, ALLOW), (RET, 0, 0, ENOSYS)]
    assert len(prog) == enosys + 1
    return prog


def _install_seccomp_filter():
    """Install the filter (needs no_new_privs, which _drop_capabilities set). It outlives exec
    and every child inherits it. On architectures not in SECCOMP_SYSCALLS nothing is installed
    (--selftest says so)."""
    if SECCOMP_SYSCALLS is None:
        return
    prog = _seccomp_program()
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Fprog(len(prog), ctypes.addressof(buf))),
                       0, 0), "seccomp")


def _join_fresh_session_keyring():
    """An anonymous session keyring: the one inherited from the caller is no longer reachable."""
    if SYS_KEYCTL is not None and _libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        raise OSError(ctypes.get_errno(), "keyctl(join session keyring)")


def _ignore_signals():
    for s in IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _restore_signals():
    for s in IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)    # KeyboardInterrupt, as usual
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)                # Python's default
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                # oversized writes raise OSError


def _keep_fds(keep):
    """Close every file descriptor except `keep`."""
    low = 0
    for fd in sorted(set(keep)) + [1 << 20]:
        if low < fd:                                  # closerange(0, 0) closes everything
            os.closerange(low, fd)
        low = fd + 1


def _children(pid):
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids


def _sigkill(pids):
    """SIGKILL each pid; one that is already gone is not an error."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_descendants():
    """SIGKILL every child, wait for it, repeat: as a child subreaper this process inherits the
    orphans of each one it kills, so the loop reaches the whole tree, setsid'd or not."""
    for _ in range(10000):
        kids = _children(os.getpid())
        if not kids:
            return
        _sigkill(kids)
        for k in kids:
            try:
                os.waitpid(k, 0)
            except ChildProcessError:
                pass


def _mountinfo():
    """(mount id, mount point, per-mount options) for each line of /proc/self/mountinfo."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            rows.append((int(fields[0]), point, set(fields[5].split(","))))
    return rows


# ---------------------------------------------------------------------------------------
# Cgroups: one per request, for the whole sandbox's memory and process count
# ---------------------------------------------------------------------------------------
def _cgroup_bases():
    """{"version": 1|2, "dirs": [...]} for the cgroup(s) this process may create children in,
    or None. v2 needs memory and pids delegated to our cgroup; v1 needs both hierarchies."""
    if os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            own = {}
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(","):
                    own[c] = path
        mounts = {}
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, post = line.split(" - ", 1)
                fstype, _, opts = post.split()[:3]
                if fstype == "cgroup2":
                    mounts.setdefault("v2", pre.split()[4])
                elif fstype == "cgroup":
                    for c in ("memory", "pids"):
                        if c in opts.split(","):
                            mounts[c] = pre.split()[4]
    except (OSError, ValueError):
        return None
    if "v2" in mounts and "" in own:
        base = mounts["v2"] + own[""].rstrip("/")
        try:
            with open(base + "/cgroup.subtree_control") as f:
                if {"memory", "pids"} <= set(f.read().split()):
                    return {"version": 2, "dirs": [base]}
        except OSError:
            pass
    if "memory" in mounts and "pids" in mounts and "memory" in own and "pids" in own:
        dirs = [mounts[c] + own[c].rstrip("/") for c in ("memory", "pids")]
        if all(os.access(d, os.W_OK) for d in dirs):
            return {"version": 1, "dirs": dirs}
    return None


class _Cgroup:
    """The cgroup(s) of one sandbox: <base>/autocode-<zygote pid>/<supervisor pid>."""

    def __init__(self, bases, zygote_pid):
        self.version = bases["version"]
        self.dirs = [f"{b}/autocode-{zygote_pid}/{os.getpid()}" for b in bases["dirs"]]
        for d in self.dirs:
            os.mkdir(d)

    def join(self):
        for d in self.dirs:
            _write(d + "/cgroup.procs", "0")

    def limit(self, memory_mb, max_procs):
        mem = str(memory_mb << 20)
        if self.version == 2:
            _write(self.dirs[0] + "/memory.max", mem)
            _write(self.dirs[0] + "/memory.swap.max", "0")
            _write(self.dirs[0] + "/pids.max", str(max_procs))
            return
        _write(self.dirs[0] + "/memory.limit_in_bytes", mem)
        if os.path.exists(self.dirs[0] + "/memory.memsw.limit_in_bytes"):
            _write(self.dirs[0] + "/memory.memsw.limit_in_bytes", mem)
        _write(self.dirs[1] + "/pids.max", str(max_procs))

    def oom_kills(self):
        name = "/memory.events" if self.version == 2 else "/memory.oom_control"
        try:
            with open(self.dirs[0] + name) as f:
                return sum(int(line.split()[1]) for line in f if line.startswith("oom_kill "))
        except OSError:
            return 0

    def remove(self):
        _kill_cgroup(self.dirs[-1])
        for d in self.dirs:
            _rmdir_retry(d)


def _cgroup_pids(d):
    try:
        with open(d + "/cgroup.procs") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _kill_cgroup(d):
    """SIGKILL everything in cgroup `d` until it is empty (new forks are caught next round)."""
    for _ in range(1000):
        pids = [p for p in _cgroup_pids(d) if p != os.getpid()]
        if not pids:
            return
        _sigkill(pids)
        time.sleep(0.001)


def _rmdir_retry(d, seconds=0.5):
    end = time.monotonic() + seconds
    while True:
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError:                              # EBUSY: an exiting task is still counted
            if time.monotonic() > end:
                return False
            time.sleep(0.005)


def remove_scratch(path, patience=2.0):
    """Remove a directory a cell could write, whatever it left there. shutil.rmtree was not
    enough (attacks in tests/test_sandbox_attacks.py): a FIFO in place of the directory blocked
    its open for good (the supervisor, then every zygote's startup sweep), and a tree 1,500
    levels deep raised RecursionError past ignore_errors. So: no link is followed, no
    non-directory is opened, a directory is opened non-blocking, and subdirectories are not
    recursed into: their entries are renamed up into the top directory, so at most two
    descriptors are open at any depth. Gives up after `patience` s (something still writing)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    is_dir = lambda name, fd: stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)  # noqa: E731
    user = os.geteuid() != 0                        # not root: a directory left at mode 000 needs a chmod
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return
        if user:
            os.chmod(path, 0o700)
        top = os.open(path, flags)
    except OSError:
        return
    tag, moved, last, end = secrets.token_hex(8), 0, None, time.monotonic() + patience
    try:
        while time.monotonic() < end:
            names = os.listdir(top)
            if not names:
                break
            if names == last:
                time.sleep(0.01)                      # no progress: something holds an entry
            last = names
            for name in names:
                try:
                    if not is_dir(name, top):
                        os.unlink(name, dir_fd=top)
                        continue
                    if user:
                        os.chmod(name, 0o700, dir_fd=top)
                    sub = os.open(name, flags, dir_fd=top)
                    try:
                        for child in os.listdir(sub):
                            if user and is_dir(child, sub):
                                os.chmod(child, 0o700, dir_fd=sub)    # moving a directory writes its ".."
                            moved += 1
                            os.rename(child, f".{tag}-{moved}", src_dir_fd=sub, dst_dir_fd=top)
                    finally:
                        os.close(sub)
                    os.rmdir(name, dir_fd=top)
                except OSError:
                    pass                              # gone meanwhile, or still busy: next pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        pass


def sweep_cgroups(only_pid=None, patience=0.5):
    """Kill what is left in, and remove, the cgroups and scratch directories of zygotes that are
    gone (or of `only_pid`). A cgroup still busy after `patience` s is left for the next sweep."""
    end = time.monotonic() + 4 * patience             # for all: thousands of leftovers cannot stall a start
    for name in os.listdir(SCRATCH_PARENT):          # a supervisor killed before its cleanup
        m = re.fullmatch(r"autocode-sandbox-(\d+)-\w+", name)
        if m and (int(m.group(1)) == only_pid if only_pid is not None else not os.path.exists(f"/proc/{m.group(1)}")):
            if time.monotonic() > end:
                break                                 # the rest at the next sweep
            remove_scratch(f"{SCRATCH_PARENT}/{name}", patience)
    bases = _cgroup_bases()
    for base in bases["dirs"] if bases else []:
        for name in os.listdir(base):
            m = re.fullmatch(r"autocode-(\d+)", name)
            if not m or (only_pid is None and os.path.exists(f"/proc/{m.group(1)}")) or \
                    (only_pid is not None and int(m.group(1)) != only_pid):
                continue
            zdir = f"{base}/{name}"
            for leaf in os.listdir(zdir):
                if os.path.isdir(f"{zdir}/{leaf}"):
                    _kill_cgroup(f"{zdir}/{leaf}")
                    _rmdir_retry(f"{zdir}/{leaf}", patience)
            _rmdir_retry(zdir, patience)


# ---------------------------------------------------------------------------------------
# R: PID 1 of the namespaces; builds the filesystem, forks W, reports how W ended
# ---------------------------------------------------------------------------------------
def _readonly_everything():
    """Every mount read-only, nodev and nosuid (noexec kept where it was)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for _, point, opts in sorted(_mountinfo(), key=lambda r: len(r[1]), reverse=True):
        if point == "/proc" or point.startswith("/proc/"):
            continue                                  # replaced by a fresh read-only /proc
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_NOEXEC if "noexec" in opts else 0)
        try:
            _mount(None, point, None, flags)
        except OSError:
            pass                                      # checked below: no writable mount may remain
    return {mid for mid, _, _ in _mountinfo()}


def _interpreter_dirs():
    dirs = (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)), *sys.path)
    return sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d)})


def _others_can_enter(dirs):
    """Whether a user that owns none of them may enter each of `dirs` and every directory above
    it: then a cell that is not root still imports from the interpreter's libraries without the
    mount namespace that _expose_interpreter needs."""
    for d in dirs:
        parts = d.split("/")
        if any(not os.stat("/".join(parts[:i])).st_mode & 0o001 for i in range(2, len(parts) + 1)):
            return False
    return True


def _expose_interpreter():
    """The cell, as SANDBOX_ID, must still reach the interpreter and its libraries. Where one
    sits below a directory other users cannot enter (a pyenv in /root, mode 700), that
    directory is covered with an empty read-only tmpfs holding only read-only binds of what the
    interpreter needs: the cell gets the interpreter, not the rest of /root."""
    hidden = {}
    for d in _interpreter_dirs():
        parts = d.split("/")
        for i in range(2, len(parts)):               # ancestors strictly above d
            top = "/".join(parts[:i])
            if not os.stat(top).st_mode & 0o001:
                hidden.setdefault(top, []).append(d)
                break
    for top, dirs in hidden.items():
        outer = [d for d in dirs if not any(d.startswith(e + "/") for e in dirs)]
        fds = [os.open(d, os.O_PATH) for d in outer]
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
        for d, fd in zip(outer, fds):
            os.makedirs(d, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)    # already ro, nodev, nosuid
            os.close(fd)
        _mount(None, top, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _check_readonly(old_ids):
    """Refuse to run if any mount we did not create is still writable, dev or suid."""
    for mid, point, opts in _mountinfo():
        if mid in old_ids and not point.startswith(("/proc", "/dev", "/run")) and \
                not {"ro", "nodev", "nosuid"} <= opts:
            raise OSError(errno.EPERM, f"mount {point} is still {','.join(sorted(opts))}")


def _private_dev(staging, tmpfs_mb):
    """A minimal /dev: the harmless character devices (read-only binds), a private shm, the
    usual symlinks. Built on `staging` and moved over /dev, hiding every other device."""
    _mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    for name in HARMLESS_DEVICES:
        open(f"{staging}/{name}", "w").close()
        _mount(f"/dev/{name}", f"{staging}/{name}", None, MS_BIND)
        _mount(None, f"{staging}/{name}", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{staging}/{name}")
    os.mkdir(f"{staging}/shm")
    _mount("tmpfs", f"{staging}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={tmpfs_mb}m,mode=1777")
    _mount(None, staging, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(staging, "/dev", None, MS_MOVE)


def _build_filesystem(old_ids, scratch, tmpfs_mb):
    _mount(None, "/proc", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _private_dev(scratch, tmpfs_mb)
    if os.path.isdir("/run"):                         # daemons' sockets live here: hide them
        _mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")
    _check_readonly(old_ids)


def _init_process(sb):
    """R. Namespaced: PID 1 that builds the sandbox; fallback: a plain parent of W."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _ignore_signals()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _keep_fds([0, 1, 2, sb.req_r, sb.w_req_r, sb.status_w, sb.out_w, sb.report_w])
    if sb.cgroup:
        sb.cgroup.join()                              # R and every descendant count against it
    if sb.isolated:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP),
               "unshare(mount, net, ipc, uts, cgroup)")
        _check(_libc.sethostname(b"sandbox", 7), "sethostname")
        old_ids = _readonly_everything()
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)   # this PID namespace's
        _expose_interpreter()
    to_w_r, to_w = os.pipe()                           # R -> W: "go" (set up)
    from_w, from_w_w = os.pipe()                       # W -> R: "my user namespace exists"
    w = os.fork()
    if w == 0:
        try:
            _keep_fds([0, 1, 2, to_w_r, from_w_w, sb.w_req_r, sb.out_w, sb.report_w])
            _worker(sb, to_w_r, from_w_w)
        except BaseException as e:                    # setup failed: say so, never run the code
            _report(sb.report_w, {"setup": _one_line(e)})
            os._exit(70)
    for fd in (to_w_r, from_w_w, sb.w_req_r, sb.out_w):   # report_w stays: R reports its own setup
        os.close(fd)
    if sb.isolated:
        if os.read(from_w, 1) != b"u":
            raise OSError("the worker died before its user namespace was mapped")
        _write(f"/proc/{w}/uid_map", f"{SANDBOX_ID} {sb.host_uid} 1")
        _write(f"/proc/{w}/gid_map", f"{SANDBOX_ID} {SANDBOX_ID} 1")
        _build_filesystem(old_ids, sb.scratch, sb.tmpfs_mb)
    os.write(to_w, b"g")
    os.close(to_w)
    waiting = [sb.req_r, os.pidfd_open(w)]           # W gets its request from G directly
    while len(waiting) == 2:                          # meanwhile G may ask for another tmpfs size
        ready, _, _ = select.select(waiting, [], [])
        if waiting[1] in ready:
            break
        line = _read_line(sb.req_r)
        if not line:
            waiting.pop(0)
            break
        _mount("tmpfs", sb.scratch, None, MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={int(line)}m")
        os.write(sb.status_w, b'{"remounted": true}\n')
    _, status = os.waitpid(w, 0)
    os.write(sb.status_w, (json.dumps({"exit": status}) + "\n").encode())
    os._exit(0)                                       # PID 1 gone: the kernel kills the rest


# ---------------------------------------------------------------------------------------
# W: the worker. Everything here happens in the forked child, before and while cells run.
# ---------------------------------------------------------------------------------------
def _limit(name, value):
    resource.setrlimit(name, (value, value))


def _report(fd, msg):
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _userns_restricted(path="/proc/sys/kernel/apparmor_restrict_unprivileged_userns"):
    """True where AppArmor confines user namespaces made without privileges (Ubuntu 23.10 on),
    or AUTOCODE_SANDBOX_USERNS_AS_ROOT=1 said to create the cells' namespace as root."""
    if _USERNS_AS_ROOT:
        return True
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _become_nobody(sb, to_w_r, from_w_w):
    """Namespaced: a user namespace of its own mapping only SANDBOX_ID (to sb.host_uid on the
    host), then that uid and gid, no capabilities. Root fallback (_FALLBACK_UID): sb.host_uid
    itself, no capabilities; uid 0 without capabilities still owned root's files, the cgroup's
    limits and cgroup.procs among them, and RLIMIT_NPROC does not bind it. Otherwise: the
    caller's uid, no capabilities."""
    if sb.isolated:
        # Created as the sandbox's own host uid, not root: whatever the cell then makes in it
        # (pending signals, which the standard signals add to past RLIMIT_SIGPENDING) is also
        # charged to the namespace's creator, host-wide. As root, one cell held 1,696 of root's
        # 96,364 pending signals; 57 at once would have made root's timers fail. A uid per
        # sandbox, not one for all (_host_uid): with all cells host uid 65534, one cell used up
        # that uid's epoll watches and the rollout beside it failed. Created as root after all
        # where unprivileged user namespaces are off, or confined by AppArmor (such a namespace
        # lacks the capabilities setup needs); the filter and rlimits still bound the charges.
        made = False
        if not _userns_restricted():
            os.seteuid(sb.host_uid)
            made = _libc.unshare(CLONE_NEWUSER) == 0
            if not made:
                os.seteuid(0)
        if not made:
            _check(_libc.unshare(CLONE_NEWUSER), "unshare(user)")
        os.write(from_w_w, b"u")                      # R writes our uid_map and gid_map
    if os.read(to_w_r, 1) != b"g":
        os._exit(0)                                   # the sandbox was discarded
    os.close(from_w_w)
    if sb.isolated or _FALLBACK_UID:
        uid = SANDBOX_ID if sb.isolated else sb.host_uid
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        for cap in range(64):                         # the bounding set needs CAP_SETPCAP: first
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        os.setresuid(uid, uid, uid)
    _drop_capabilities()
    _join_fresh_session_keyring()


def _worker(sb, to_w_r, from_w_w):
    """W: set up everything that does not depend on the request, then block until it comes."""
    os.setsid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        _write("/proc/self/oom_score_adj", "1000")    # the first victim, host-wide
    except OSError:
        pass
    _become_nobody(sb, to_w_r, from_w_w)
    _install_seccomp_filter()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # a uid change clears it
    _restore_signals()
    os.chdir(sb.scratch)
    os.environ.clear()
    os.environ.update(SAFE_ENV, HOME=sb.scratch, TMPDIR=sb.scratch)
    if sb.tag:
        os.environ[TAG] = sb.tag
    sys.set_int_max_str_digits(0)
    os.close(to_w_r)
    line = _read_line(sb.w_req_r)
    os.close(sb.w_req_r)
    if not line:
        os._exit(0)
    req = json.loads(line)
    mb = 1 << 20
    _limit(resource.RLIMIT_AS, req["memory_mb"] * mb)
    _limit(resource.RLIMIT_FSIZE, req["file_mb"] * mb)
    _limit(resource.RLIMIT_NOFILE, req["max_files"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, int(req["timeout"] * len(req["cells"])) + 2)
    _limit(resource.RLIMIT_NPROC, req["max_procs"])
    # charged host-wide to the namespace's creator as well (see SECCOMP_SYSCALLS): these cap
    # what one sandbox adds (a cell once queued real-time signals to itself past root's 96k
    # limit of pending signals and root's timer_create failed)
    _limit(resource.RLIMIT_SIGPENDING, SIGPENDING_MAX)
    _limit(resource.RLIMIT_MSGQUEUE, 0)
    _limit(resource.RLIMIT_MEMLOCK, 0)
    _run_cells(req["cells"], sb.out_w, sb.report_w)


def _run_cells(cells, out_w, report_w):
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    error, me = None, os.getpid()
    for i, cell in enumerate(cells):
        last = i == len(cells) - 1
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_w if last else null, 1)           # only the last cell's output is shown
        os.dup2(out_w if last else null, 2)
        _report(report_w, {"cell": i})
        # an earlier block's exception, exit() or sys.exit() included, ends that block only, as
        # in a notebook: stopping there made every later block of the solution "ok" unrun
        error = _run_cell(cell, scope, f"<cell {i + 1}>", show_last=last)
        if os.getpid() != me:                         # a child the block forked ends with the block:
            _exit(error)                              # it never runs, nor reports, the next ones
    if error is not None and not isinstance(error, SystemExit):
        _report(report_w, {"error": _one_line(error)})
    _exit(error)


def _exit(error):
    """W's status: 0, or what sys.exit() asked for (an exception is reported, not an exit status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    code = 0
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    os._exit(code & 0xFF)


def _run_cell(source, scope, name, show_last):
    """Exec one cell; with show_last, print the value of a trailing bare expression."""
    try:
        tree = ast.parse(source, name)
        tail = None
        if show_last and tree.body and isinstance(tree.body[-1], ast.Expr):
            tail = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), scope)
        if tail is not None:
            value = eval(compile(tail, name, "eval"), scope)
            if value is not None:
                print(repr(value))
        return None
    except SystemExit as e:
        return e
    except BaseException as e:                         # KeyboardInterrupt, MemoryError, ...
        try:
            sys.stderr.write(traceback.format_exception_only(type(e), e)[-1])
        except BaseException:
            pass
        return e


def _one_line(e):
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    line = text[-1] if text else type(e).__name__
    return line[:300]


# ---------------------------------------------------------------------------------------
# G: one request's supervisor, forked by the zygote before the request exists
# ---------------------------------------------------------------------------------------
def _read_line(fd, limit=1 << 30):
    """One line from a pipe, read without buffering past it (others read the same pipe)."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        data = os.read(fd, 1 << 16)
        if not data:
            return b""
        buf += data
    return buf


class _Capture:
    """Keeps the first and last `cap` // 2 bytes of a stream, counting the rest."""

    def __init__(self, cap):
        self.cap, self.head, self.tail, self.total = cap, bytearray(), bytearray(), 0

    def add(self, data):
        self.total += len(data)
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail = (self.tail + data)[-(self.cap // 2):]

    def text(self):
        cut = self.total - len(self.head) - len(self.tail)
        mid = f"\n...[{cut} bytes cut]...\n" if cut > 0 else ""
        return (bytes(self.head).decode(errors="replace") + mid + bytes(self.tail).decode(errors="replace"))


def _clean_line(text, limit=300):
    """Untrusted text as one line the caller can print and tokenize: valid UTF-8 (a lone
    surrogate, as in `raise ValueError('\\udcff')`, made the caller's tokenizer raise), the
    first line only, no control characters, at most `limit` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    line = next(iter(text.splitlines()), "")
    return "".join(c if c.isprintable() else "?" for c in line)[:limit]


class _Report:
    """W's own account (cell index, last exception): untrusted, so parsed strictly."""

    def __init__(self, n):
        self.n, self.cell, self.error, self.setup, self.tampered, self.buf = n, -1, None, None, False, b""
        self.lines = 0

    def add(self, data):
        """Returns True when a new cell has started. W writes one line per cell and one error
        or setup line: past that, or once anything is malformed, the rest is not parsed (a cell
        that wrote a megabyte of empty lines kept G parsing for seconds past the caller's
        deadline, and a cell that had finished in time was reported as a timeout)."""
        if self.tampered:
            return False
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        self.lines += len(lines)
        if len(self.buf) > 1024 or self.lines > self.n + 1:
            self.tampered, self.buf = True, b""
            return False
        started = False
        for line in lines:
            try:
                msg = json.loads(line)
                (key, value), = msg.items()
            except (ValueError, AttributeError):
                self.tampered = True
                continue
            if key == "cell" and type(value) is int and self.cell < value < self.n:
                self.cell, started = value, True
            elif key in ("error", "setup") and type(value) is str and getattr(self, key) is None:
                setattr(self, key, _clean_line(value))
            else:
                self.tampered = True
        return started


def _host_uid(uid_map="/proc/self/uid_map"):
    """A fresh host uid for one sandbox's cells, drawn from HOST_UID_RANGE: rollouts that run at
    once are then different users, in this process or in another container that shares the
    host's users (a uid derived from the zygote's pid was the same in two such containers).
    A uid that the user database knows is never drawn: the cell would own that user's files.
    SANDBOX_ID where this process's user namespace does not map the range (a container with
    remapped users, often 0-65535 only): the module docstring says what its cells then share."""
    lo, hi = HOST_UID_RANGE
    with open(uid_map) as f:
        mapped = any(inside <= lo and hi <= inside + count
                     for inside, _, count in (map(int, line.split()) for line in f))
    for _ in range(100) if mapped else ():
        uid = lo + secrets.randbelow(hi - lo)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    return SANDBOX_ID


class _Sandbox:
    """What G keeps about the sandbox it built (R and W are forked with copies of it)."""

    def __init__(self, isolated, tmpfs_mb, cgroup, tag, zygote_pid):
        self.isolated, self.tmpfs_mb, self.cgroup, self.tag = isolated, tmpfs_mb, cgroup, tag
        self.req_r, self.req_w = os.pipe()            # G -> R: another tmpfs size, if asked
        self.w_req_r, self.w_req_w = os.pipe()        # G -> W: the request
        self.status_r, self.status_w = os.pipe()      # R -> G: how W ended (trusted)
        self.out_r, self.out_w = os.pipe()            # W -> G: the output
        self.report_r, self.report_w = os.pipe()      # W -> G: cell index, exception (untrusted)
        self.scratch = tempfile.mkdtemp(prefix=f"autocode-sandbox-{zygote_pid}-", dir=SCRATCH_PARENT)
        self.host_uid = _host_uid()                   # what the cell is on the host (namespaced, or _FALLBACK_UID)
        if _FALLBACK_UID:
            os.chown(self.scratch, self.host_uid, self.host_uid)
        self.r = None


def _supervisor(isolated, bases, zygote_pid, taken_w, req_fd, res_fd, tag):
    """G: build a sandbox, wait for one request, run it, answer, clean up, exit."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _ignore_signals()
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)   # orphans of the request come back here
    _keep_fds([0, 1, 2, req_fd, res_fd, taken_w])
    try:
        _write("/proc/self/oom_score_adj", "-1000")   # the memory cgroup kills a cell, not G or R
    except OSError:
        pass
    sb = _Sandbox(isolated, DEFAULTS["tmpfs_mb"], _Cgroup(bases, zygote_pid) if bases else None, tag, zygote_pid)
    result = None
    try:
        if isolated:
            _check(_libc.unshare(CLONE_NEWPID), "unshare(pid)")
        sb.r = os.fork()
        if sb.r == 0:
            try:
                _init_process(sb)
            except BaseException as e:
                _report(sb.report_w, {"setup": _one_line(e)})
            os._exit(70)
        for fd in (sb.req_r, sb.w_req_r, sb.status_w, sb.out_w, sb.report_w):
            os.close(fd)
        line = _read_line(req_fd)
        if not line:
            os.write(taken_w, b"E")
            return
        req = json.loads(line)
        try:
            result = _watch(req, sb)
        except Exception as e:
            result = {"output": "", "ok": False, "error": f"sandbox error: {_one_line(e)}"}
        result["id"] = req.get("id")
        _write_all(res_fd, (json.dumps(result) + "\n").encode())
        try:
            os.write(taken_w, b"T")    # Z builds the next sandbox now, not while this one runs
        except BrokenPipeError:        # Z is gone (killed by the caller's deadline)
            pass
    except BaseException:
        traceback.print_exc()                         # a bug in G: say where, on Z's stderr
    finally:
        _cleanup(sb)
        os._exit(0)


def _cleanup(sb):
    if sb.r:
        try:
            os.kill(sb.r, signal.SIGKILL)             # namespaced: R is PID 1, the rest goes too
        except ProcessLookupError:
            pass
    _kill_descendants()                               # fallback: every orphan came back to G
    if sb.cgroup:
        sb.cgroup.remove()
    remove_scratch(sb.scratch)


def _watch(req, sb):
    """Hand the request to R, then collect output and reports until R says W has ended or the
    deadline passes. Only R's report and G's clock decide; see the module docstring."""
    n, timeout = len(req["cells"]), req["timeout"]
    if sb.cgroup:
        sb.cgroup.limit(req["memory_mb"], req["max_procs"] + 1)     # + R
    status_buf = b""
    if sb.isolated and req["tmpfs_mb"] != sb.tmpfs_mb:
        os.write(sb.req_w, b"%d\n" % req["tmpfs_mb"])
        if select.select([sb.status_r], [], [], SETUP_SLACK)[0]:
            line = _read_line(sb.status_r)
            status_buf = b"" if line == b'{"remounted": true}\n' else line     # else R's last word
    os.close(sb.req_w)
    try:
        _write_all(sb.w_req_w, json.dumps({k: req[k] for k in DEFAULTS if k != "max_output"}
                                          | {"cells": req["cells"]}).encode() + b"\n")
    except BrokenPipeError:                           # W is gone (setup failed): R's status says so
        pass
    os.close(sb.w_req_w)
    start = time.monotonic()
    hard = start + SETUP_SLACK + n * timeout
    deadline = start + SETUP_SLACK + timeout
    out, report, status = _Capture(req["max_output"]), _Report(n), None
    if status_buf.endswith(b"\n"):
        status = json.loads(status_buf)["exit"]
    sel = selectors.DefaultSelector()
    for fd, what in ((sb.out_r, "out"), (sb.report_r, "report"), (sb.status_r, "status")):
        sel.register(fd, selectors.EVENT_READ, what)
    timed_out = False
    while status is None:
        wait = min(deadline, hard) - time.monotonic()
        if wait <= 0:
            timed_out = True
            break
        for key, _ in sel.select(wait):
            data = os.read(key.fd, 1 << 16)
            if key.data == "out":
                out.add(data)
            elif key.data == "report":
                if report.add(data):
                    deadline = time.monotonic() + timeout
            else:
                status_buf += data
                if not data or status_buf.endswith(b"\n"):
                    status = json.loads(status_buf)["exit"] if data else "lost"
            if not data:
                sel.unregister(key.fd)
    if status is not None:                            # what W wrote before it ended is in the pipes
        for fd, sink in ((sb.out_r, out.add), (sb.report_r, report.add)):
            for _ in range(64):                       # bounded: a daemon may keep writing
                data = _read_ready(fd)
                if not data:
                    break
                sink(data)
    sel.close()
    return _verdict(req, out, report, status, timed_out, sb)


def _verdict(req, out, report, status, timed_out, sb):
    res = {"output": out.text(), "ok": False, "error": None}
    if timed_out:
        res["error"], res["timed_out_cell"] = f"Timeout after {req['timeout']:g} s", max(report.cell, 0)
    elif report.setup is not None:
        res["error"] = f"sandbox setup failed: {report.setup}"
    elif status == "lost":
        res["error"] = "Killed: the sandbox's init process died"
    elif os.WIFSIGNALED(status):
        res["error"] = f"Killed by signal {os.WTERMSIG(status)}"
        if sb.cgroup and sb.cgroup.oom_kills():
            res["error"] += f" (out of memory: memory_mb={req['memory_mb']} for the whole sandbox)"
    elif os.WEXITSTATUS(status) != 0:
        res["error"] = f"Exited with code {os.WEXITSTATUS(status)}"
    elif report.tampered:
        res["error"] = "The cell wrote to the sandbox's report channel"
    else:
        res["error"], res["ok"] = report.error, report.error is None
    return res


def _read_ready(fd):
    """Bytes already in the pipe, without blocking (b"" when none or at EOF)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


# ---------------------------------------------------------------------------------------
# Z: the zygote. Forks supervisors; never reads a request.
# ---------------------------------------------------------------------------------------
def _fork_supervisor(isolated, bases, req_fd=0, res_fd=1, tag=None):
    taken_r, taken_w = os.pipe()
    zygote_pid = os.getpid()
    g = os.fork()
    if g == 0:
        try:
            os.close(taken_r)
            _supervisor(isolated, bases, zygote_pid, taken_w, req_fd, res_fd, tag)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(71)
    os.close(taken_w)
    return g, taken_r


def _probe_isolation(bases):
    """Does a namespaced sandbox run `pass`? Through the real path, with its own pipes."""
    req_r, req_w = os.pipe()
    res_r, res_w = os.pipe()
    g, taken_r = _fork_supervisor(True, bases, req_r, res_w)
    os.close(req_r)
    os.close(res_w)
    os.write(req_w, (json.dumps(dict(DEFAULTS, cells=["pass"], id="probe")) + "\n").encode())
    line = _read_line(res_r)
    for fd in (req_w, res_r, taken_r):
        os.close(fd)
    os.waitpid(g, 0)
    return bool(line) and json.loads(line)["ok"]


_USERNS_AS_ROOT = False
_FALLBACK_UID = False       # the root fallback's cells run as their sandbox's host uid (serve decides)


def serve(namespaces=True, root_fallback=False, userns_as_root=False, fallback_uid="auto"):
    """Zygote main loop: each request line on stdin is read, and answered on stdout, by a
    supervisor forked before it came."""
    global _USERNS_AS_ROOT, _FALLBACK_UID
    _USERNS_AS_ROOT = userns_as_root
    for name in WARM_IMPORTS:
        try:
            __import__(name)
        except ImportError:
            pass
    try:
        exec(WARM_UP, {})
    except Exception:                                 # numpy or sympy missing: cells import them
        pass
    _ignore_signals()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)          # and so every process forked from here
    gc.collect()
    gc.freeze()             # forked children then copy far fewer pages (no gc writes to them)
    sweep_cgroups()                                   # left by zygotes that were killed
    bases = _cgroup_bases()
    if bases:
        for b in bases["dirs"]:
            os.mkdir(f"{b}/autocode-{os.getpid()}")
            if bases["version"] == 2:
                _write(f"{b}/autocode-{os.getpid()}/cgroup.subtree_control", "+memory +pids")
    isolated = namespaces and os.geteuid() == 0 and _probe_isolation(bases)
    _FALLBACK_UID = not isolated and os.geteuid() == 0 and root_fallback and \
        (fallback_uid == "always" or fallback_uid == "auto" and _others_can_enter(_interpreter_dirs()))
    hello = {"ready": True, "isolated": isolated, "cgroup": bases and bases["version"], "fallback_uid": _FALLBACK_UID}
    if not isolated and os.geteuid() == 0 and not root_fallback:
        hello = {"refused": "sandbox: running as root without namespaces "
                            f"({'turned off' if not namespaces else 'not available here'}); cells would run "
                            "as root with no isolation. Set AUTOCODE_SANDBOX_ROOT_FALLBACK=1 to accept "
                            "(see FALLBACK_GAPS in sandbox.py)"}
    os.write(1, (json.dumps(hello) + "\n").encode())
    live = set()
    wake_r, wake_w = os.pipe()                        # SIGCHLD wakes Z to reap a finished G
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    try:
        while "refused" not in hello:
            g, taken_r = _fork_supervisor(isolated, bases, tag=os.environ.get(TAG))
            live.add(g)
            while True:
                ready, _, _ = select.select([taken_r, wake_r], [], [], 0.2)
                _reap(live, block=False)
                if taken_r in ready:
                    break
                if wake_r in ready:
                    os.read(wake_r, 4096)
            taken = os.read(taken_r, 1)               # G has its request, or stdin closed
            os.close(taken_r)
            if taken == b"E":
                break
            if taken != b"T":                         # G died before taking a request
                print("sandbox: a supervisor failed to start", file=sys.stderr)
                time.sleep(0.1)
    finally:
        _reap(live, block=True)
        _kill_descendants()
        sweep_cgroups(os.getpid())


def _reap(live, block):
    """Wait for finished supervisors; kill anything else that was orphaned to the zygote."""
    for g in list(live):
        try:
            if os.waitpid(g, 0 if block else os.WNOHANG)[0]:
                live.discard(g)
        except ChildProcessError:
            live.discard(g)
    for k in _children(os.getpid()):
        if k not in live:
            try:
                os.kill(k, signal.SIGKILL)
                os.waitpid(k, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


# ---------------------------------------------------------------------------------------
# Client side: a pool of zygotes, run_cells and run_batch
# ---------------------------------------------------------------------------------------
class _Zygote:
    def __init__(self):
        flags = []
        if os.environ.get("AUTOCODE_SANDBOX_NAMESPACES", "1") == "0":
            flags.append("--no-namespaces")
        if os.environ.get("AUTOCODE_SANDBOX_ROOT_FALLBACK", "0") == "1":
            flags.append("--root-fallback")
        if os.environ.get("AUTOCODE_SANDBOX_USERNS_AS_ROOT", "0") == "1":
            flags.append("--userns-as-root")
        flags.append("--fallback-uid=" + {"1": "always", "0": "never"}.get(
            os.environ.get("AUTOCODE_SANDBOX_FALLBACK_UID", ""), "auto"))
        # -s: no user site-packages. HOME is /tmp, so a .pth file any user (or a fallback cell)
        # put in /tmp/.local would otherwise run in the next zygote, as root
        self.proc = subprocess.Popen([sys.executable, "-s", os.path.abspath(__file__), "--serve", *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=dict(SAFE_ENV, **{TAG: str(os.getpid())}),
                                     start_new_session=True, close_fds=True)
        self.buf = b""
        line = self._read_line(time.monotonic() + 120)
        hello = json.loads(line) if line else {"refused": "sandbox: the zygote did not start"}
        if "refused" in hello:
            self.close()
            raise SandboxRefused(hello["refused"])
        self.isolated, self.cgroup, self.dead = hello["isolated"], hello["cgroup"], False
        self.fallback_uid = hello["fallback_uid"]

    def _read_line(self, deadline):
        """One line from the zygote by `deadline`, else None; b"" if it died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], wait)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    return b""
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def ask(self, req):
        """The zygote's answer, or an error result: the caller's own deadline holds whatever
        happens inside, and only a line carrying this request's random id is an answer."""
        req = dict(req, id=secrets.token_hex(16))
        deadline = time.monotonic() + len(req["cells"]) * req["timeout"] + CLIENT_GRACE
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._replace("sandbox crashed")
        while True:
            line = self._read_line(deadline)
            if line is None:
                return self._replace(f"Timeout after {req['timeout']:g} s (the sandbox did not answer; restarted)")
            if not line:
                return self._replace("sandbox crashed")
            try:
                res = json.loads(line)
            except ValueError:
                continue
            if isinstance(res, dict) and res.get("id") == req["id"]:
                return res

    def _replace(self, error):
        """Kill this zygote; the next call starts a fresh one (not now: the answer is due)."""
        self.kill()
        self.dead = True
        return {"output": "", "ok": False, "error": error}

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Z, its supervisors and their R
        except ProcessLookupError:
            pass
        self.proc.wait()
        sweep_cgroups(self.proc.pid, patience=0.05)    # W's and the cells' processes
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def close(self):
        try:
            self.proc.stdin.close()                   # the zygote cleans up and exits
            self.proc.wait(timeout=5)
            self.proc.stdout.close()
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


_idle: queue.Queue = queue.Queue()
_all: list = []
_lock = threading.Lock()


def _acquire():
    try:
        return _idle.get_nowait()
    except queue.Empty:
        z = _Zygote()
        with _lock:
            _all.append(z)
        return z


def _release(z):
    if not z.dead:
        _idle.put(z)
        return
    with _lock:
        if z in _all:
            _all.remove(z)


@atexit.register
def shutdown():
    """Stop every zygote (called at exit; safe to call any time)."""
    with _lock:
        for z in _all:
            z.close()
        _all.clear()
    while not _idle.empty():
        _idle.get_nowait()


def isolated():
    """Whether this machine gives the sandbox its namespaces (see the module docstring)."""
    z = _acquire()
    _idle.put(z)
    return z.isolated


def _validate(cells, timeout, limits):
    if isinstance(cells, str):
        cells = [cells]
    if not isinstance(cells, (list, tuple)) or not all(isinstance(c, str) for c in cells):
        raise TypeError(f"sandbox: cells must be a string or a list of strings, got {type(cells).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"sandbox: timeout must be a finite number of seconds in (0, {MAX_TIMEOUT:g}], "
                         f"got {timeout!r}")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sandbox: {name} must be a positive integer, got {value!r}")
    return list(cells), float(timeout)


def run_cells(cells, timeout=DEFAULTS["timeout"], memory_mb=DEFAULTS["memory_mb"],
              max_output=DEFAULTS["max_output"], file_mb=DEFAULTS["file_mb"],
              max_files=DEFAULTS["max_files"], max_procs=DEFAULTS["max_procs"],
              tmpfs_mb=DEFAULTS["tmpfs_mb"]):
    """Run one solution's code blocks in order; see the module docstring."""
    limits = dict(memory_mb=memory_mb, max_output=max_output, file_mb=file_mb, max_files=max_files,
                  max_procs=max_procs, tmpfs_mb=tmpfs_mb)
    cells, timeout = _validate(cells, timeout, limits)
    if not cells:
        return Result("", True, None)
    note, done = "", 0                                # done: blocks before cells[0]
    while True:
        z = _acquire()
        try:
            res = z.ask(dict(limits, cells=cells, timeout=timeout))
        finally:
            _release(z)
        i = res.get("timed_out_cell")
        if i is None or i >= len(cells) - 1:
            return Result(note + res["output"], res["ok"], res["error"])
        note = f"(block {done + i + 1} timed out after {timeout:g} s; state was reset)\n"
        cells, done = cells[i + 1:], done + i + 1     # fresh interpreter from the next block


def run_batch(batch, workers=None, **limits):
    """run_cells over many solutions, up to `workers` at once (default: the core count)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda cells: run_cells(cells, **limits), batch))


SELFTEST_PROBE = r"""
import ctypes, json, os, resource
libc = ctypes.CDLL(None, use_errno=True)
new_uts = libc.unshare(0x04000000) == 0
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
writable = []                                    # opened for writing (never written: a probe)
for root, _, files in os.walk("/proc/sys"):
    for name in files:
        try:
            os.close(os.open(os.path.join(root, name), os.O_WRONLY))
            writable.append(os.path.join(root, name)[10:])
        except OSError:
            pass
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "cap_eff": status["CapEff"].strip(),
                  "cap_bnd": status["CapBnd"].strip(), "nnp": status["NoNewPrivs"].strip(),
                  "ns": {n: os.readlink("/proc/self/ns/" + n) for n in NAMESPACES},
                  "hostname": os.uname().nodename, "proc_sys_writable": writable, "cwd": os.getcwd(),
                  "mounts": [line.split()[:6] for line in open("/proc/self/mountinfo")],
                  "dev": sorted(os.listdir("/dev")), "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
                  "seccomp": status["Seccomp"].strip(), "new_namespace": new_uts}))
"""
NAMESPACES = ("pid", "mnt", "net", "ipc", "uts", "user", "cgroup")


def _mounts_locked(facts):
    """Every mount read-only, nodev, nosuid; the scratch and /dev/shm writable but nodev, nosuid;
    the harmless devices read-only, nosuid."""
    point = {m[0]: m[4] for m in facts["mounts"]}
    parent = {m[0]: m[1] for m in facts["mounts"]}
    covered = {m[1] for m in facts["mounts"] if point.get(m[1]) == m[4]}     # overmounted: hidden

    def visible(mid):
        return mid not in covered and (parent[mid] not in point or visible(parent[mid]))
    bad = []
    for mid, _, _, _, point, opts in facts["mounts"]:
        if not visible(mid):
            continue
        opts = set(opts.split(","))
        need = {"nodev", "nosuid"} if point in (facts["cwd"], "/dev/shm") else \
            {"ro", "nosuid"} if point in [f"/dev/{d}" for d in HARMLESS_DEVICES] else {"ro", "nodev", "nosuid"}
        if not need <= opts:
            bad.append(point)
    return bad


def selftest():
    """Run a probe in a real sandbox and print, measured from inside, which protections hold."""
    try:
        z = _acquire()
        _idle.put(z)
        res = run_cells([SELFTEST_PROBE.replace("NAMESPACES", repr(NAMESPACES))], timeout=60)
        facts = json.loads(res.output) if res.ok else print(f"the probe failed: {res.error}")
    except SandboxRefused as e:
        print(f"refused: {e}")
        z, facts = None, None
    if facts:
        host_ns = {n: os.readlink("/proc/self/ns/" + n) for n in NAMESPACES}
        bad = _mounts_locked(facts)
        rows = [(f"{n} namespace", facts["ns"][n] != host_ns[n], "") for n in NAMESPACES]
        rows += [
            ("unprivileged uid/gid", facts["uid"] != 0 and facts["gid"] != 0, f"uid {facts['uid']} gid {facts['gid']}"),
            ("no capabilities (effective and bounding)", int(facts["cap_eff"], 16) == 0 == int(facts["cap_bnd"], 16), ""),
            ("no_new_privs", facts["nnp"] == "1", ""),
            ("no new namespaces, mounts, inotify, file locks, keys (seccomp)", facts["seccomp"] == "2" and not facts["new_namespace"],
             "" if SECCOMP_SYSCALLS else f"no filter for {platform.machine()}"),
            ("every mount read-only, nodev, nosuid", not bad, "still open: " + ", ".join(bad) if bad else ""),
            ("/proc/sys read-only", not facts["proc_sys_writable"], f"{len(facts['proc_sys_writable'])} open for writing"
             + (": " + ", ".join(facts["proc_sys_writable"][:3]) if facts["proc_sys_writable"] else "")),
            ("minimal /dev", set(facts["dev"]) <= set(HARMLESS_DEVICES) | {"fd", "stdin", "stdout", "stderr", "shm"},
             " ".join(facts["dev"]) if len(facts["dev"]) < 15 else f"{len(facts['dev'])} entries"),
            ("own hostname", facts["hostname"] != platform.node(), facts["hostname"]),
            ("whole-sandbox memory and process bound (cgroup)", bool(z.cgroup), f"cgroup v{z.cgroup}" if z.cgroup else
             "none: RLIMIT_AS per process, RLIMIT_NPROC"),
            ("verdict from R's waitpid and G's clock, not from the cell", True, "structural"),
            ("caller's own deadline (cells x timeout + %g s)" % CLIENT_GRACE, True, "structural"),
            ("no request data in the zygote when a worker forks", True, "structural"),
        ]
        cells = "" if z.isolated or os.geteuid() != 0 else \
            ", cells as a drawn uid" if z.fallback_uid else ", cells as uid 0 without capabilities"
        print(f"mode: {'namespaces' if z.isolated else 'FALLBACK (no namespaces)'}, running as "
              f"{'root' if os.geteuid() == 0 else 'uid %d' % os.geteuid()}{cells}")
        for name, on, note in rows:
            print(f"  {'on ' if on else 'OFF'}  {name}" + (f"  ({note})" if note else ""))
    print("the fallback (" + ("IN USE here" if facts and not z.isolated else "not in use here") +
          ") does NOT protect against:")
    for gap in FALLBACK_GAPS:
        print("  - " + gap)


def main():
    ap = argparse.ArgumentParser(description="Run Python in the sandbox (a quick manual try).")
    ap.add_argument("-c", "--code", action="append", help="a cell; repeat for several cells")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-namespaces", dest="namespaces", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--root-fallback", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--userns-as-root", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fallback-uid", choices=["auto", "always", "never"], default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--selftest", action="store_true", help="measure, from inside a sandbox, each protection")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = ap.parse_args()
    if args.serve:
        return serve(args.namespaces, args.root_fallback, args.userns_as_root, args.fallback_uid)
    if args.selftest:
        return selftest()
    limits = {k: getattr(args, k) for k in DEFAULTS}
    t = time.perf_counter()
    try:
        res = run_cells(args.code or ["print(1+1)"], **limits)
    except (ValueError, SandboxRefused) as e:
        sys.exit(str(e))
    print(res.output, end="" if res.output.endswith("\n") else "\n")
    print(f"[ok={res.ok} error={res.error} {1000 * (time.perf_counter() - t):.1f} ms]", file=sys.stderr)


if __name__ == "__main__":
    main()
