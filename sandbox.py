"""sandbox.py -- run model-written Python, contained, in a few milliseconds.

Contract (model.py, evaluate.py and the tests rely on exactly this):
  run_cells(cells, timeout=5.0, memory_mb=1024, ...) -> Result(output, ok, error)
      Runs the code blocks of one solution in order, like notebook cells: later blocks see
      names defined by earlier ones. `output` is what the LAST block printed (stdout and
      stderr, head + tail kept past `max_output` bytes); if the last block ends in a bare
      expression its value is printed, as in a notebook. `ok` means the last block finished
      without exception, timeout or crash; `error` is one short line or None.
      A block that times out resets the state: later blocks run in a fresh interpreter and
      their output starts with a note saying so.
  run_batch(list_of_cell_lists, workers=os.cpu_count(), ...) -> list[Result], order kept.
  python sandbox.py -c "print(1+1)"         # a quick manual try
  python sandbox.py --selftest              # print which protections this machine allows

How it works. A pool of pre-warmed server processes ("zygotes") is started once, with a
scrubbed environment and numpy + sympy already imported. For each request a zygote forks:
  G  a supervisor outside any namespace, which calls unshare(CLONE_NEWPID) and forks
  R  PID 1 of a new PID namespace; it enters new mount and network namespaces, remounts every
     filesystem read-only, mounts a fresh /proc and a private tmpfs on an empty scratch
     directory and on /dev/shm, and forks
  W  the worker: its own session, resource limits, no capabilities, cwd = HOME = TMPDIR =
     the scratch tmpfs, stdin empty; it runs the cells.
The zygote enforces the wall-clock limit per cell from outside and SIGKILLs R on timeout;
when R (PID 1) dies the kernel kills everything left in its namespace: children, fork
trees, setsid daemons. Nothing a cell writes outlives the call (tmpfs in a private mount
namespace). Forking a warm zygote costs a few ms, against ~36 ms for a fresh `python -c`
and ~300 ms for one that imports sympy.

Limits (flags of run_cells / run_batch; defaults in brackets):
  timeout       wall-clock seconds per cell, SIGKILL from the parent [5.0]
  memory_mb     address-space limit (RLIMIT_AS); a huge allocation raises MemoryError [1024]
  max_output    bytes of output kept, head + tail with a marker [20000]
  file_mb       largest file a cell may write (RLIMIT_FSIZE) [16]
  max_files     open file descriptors (RLIMIT_NOFILE) [64]
  max_procs     processes and threads of the user (RLIMIT_NPROC; root is exempt) [64]
  tmpfs_mb      size of the private /tmp [64]
  Python's int-to-str digit limit is lifted, so huge integers print.

Isolation needs root (or CAP_SYS_ADMIN), as in CI here; AUTOCODE_SANDBOX_NAMESPACES=0 turns
it off (the tests run the fallback that way too). Without it the sandbox falls back to: a process group killed on timeout, resource limits, a temporary directory removed
afterwards, a scrubbed environment. In that fallback it does NOT stop: a daemon that
double-forks and calls setsid surviving the call, network access, writes to any file the
user can write, reading other processes' /proc entries of the same user.
As root, RLIMIT_NPROC does not apply: a fork bomb runs until the cell's timeout, then its
whole PID namespace is killed (a pids cgroup would bound it sooner; we tried one, and the
kernel releases the pid counts of torn-down namespaces lazily, so a busy pool hit its limit
spuriously).
Never protected against, in either mode: reading files the user (root) can read (secrets
on disk: keep them off the machine that runs rollouts), CPU contention with the host,
kernel exploits. It is a guard for model-written math code, not for a determined attacker.
"""
import argparse
import ast
import atexit
import ctypes
import gc
import json
import os
import queue
import resource
import selectors
import signal
import shutil
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
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
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


# ---------------------------------------------------------------------------------------
# Linux plumbing (ctypes: Python 3.11 has no os.unshare / os.mount)
# ---------------------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 1, 38, 24, 36
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


def _drop_capabilities():
    """No capabilities at all: root inside the sandbox cannot remount, mount or kill outside."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3, this pid
    data = (ctypes.c_uint32 * 6)()                     # effective/permitted/inheritable = 0
    _check(_libc.capset(header, data), "capset")
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _mount_points():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _private_filesystem(tmpfs_mb, scratch):
    """In a new mount namespace: everything read-only, a fresh /proc, and private tmpfs on the
    (empty) scratch directory and /dev/shm: the only places a cell can write."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for point in sorted(_mount_points(), key=len, reverse=True):
        if point.startswith("/proc"):
            continue
        try:
            _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        except OSError:
            pass                                    # e.g. already read-only with locked flags
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for point in (scratch, "/dev/shm"):       # not /tmp itself: the interpreter may live there
        if os.path.isdir(point):
            _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=1777")


# ---------------------------------------------------------------------------------------
# The worker W: runs the cells. Everything here happens in the forked child.
# ---------------------------------------------------------------------------------------
def _limit(name, value):
    resource.setrlimit(name, (value, value))


def _worker(sb):
    """W: set up everything that does not depend on the request, then block until it comes,
    so a request costs no fork at all."""
    os.setsid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if not sb.isolated:                               # the zygote kills this group afterwards
        os.write(sb.status_w, (json.dumps({"w": os.getpid()}) + "\n").encode())
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.chdir(sb.scratch)
    os.environ.clear()
    os.environ.update(SAFE_ENV, HOME=sb.scratch, TMPDIR=sb.scratch)
    if sb.isolated:
        _drop_capabilities()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # oversized writes raise OSError instead
    sys.set_int_max_str_digits(0)
    with os.fdopen(sb.req_r) as f:
        req = json.loads(f.readline() or "null")
    if req is None:                                   # the zygote discarded this sandbox
        os._exit(0)
    mb = 1 << 20
    _limit(resource.RLIMIT_AS, req["memory_mb"] * mb)
    _limit(resource.RLIMIT_FSIZE, req["file_mb"] * mb)
    _limit(resource.RLIMIT_NOFILE, req["max_files"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, int(req["timeout"] * len(req["cells"])) + 2)
    _limit(resource.RLIMIT_NPROC, req["max_procs"])   # root ignores it: see the docstring
    status_w, out_w = sb.status_w, sb.out_w
    status = os.fdopen(status_w, "w", buffering=1)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    cells = req["cells"]
    for i, cell in enumerate(cells):
        last = i == len(cells) - 1
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_w if last else null, 1)           # only the last cell's output is shown
        os.dup2(out_w if last else null, 2)
        status.write(json.dumps({"cell": i}) + "\n")
        error = _run_cell(cell, scope, f"<cell {i + 1}>", show_last=last)
        if error is not None and last or isinstance(error, SystemExit):
            break
    sys.stdout.flush()
    sys.stderr.flush()
    code = 0
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        error = None if code == 0 else f"Exited with code {code}"
    elif error is not None:
        error = _one_line(error)
    status.write(json.dumps({"done": True, "ok": error is None, "error": error}) + "\n")
    status.flush()
    os._exit(code)


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
# The zygote: a long-lived server that forks G -> R -> W per request.
# ---------------------------------------------------------------------------------------
def _describe(status):
    if os.WIFSIGNALED(status):
        return f"Killed by signal {os.WTERMSIG(status)}"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
        return f"Exited with code {os.WEXITSTATUS(status)}"
    return None


def _setup_failed(status_w, e):
    os.write(status_w, (json.dumps({"done": True, "ok": False,
                                    "error": f"sandbox setup failed: {e}"}) + "\n").encode())
    os._exit(70)


def _init_process(sb):
    """R: PID 1 of the namespace (or a plain parent in the fallback). Builds the sandbox
    ahead of time, forks W (which waits for the request) and reports how W ended."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if sb.isolated:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(mount, net)")
        _private_filesystem(sb.tmpfs_mb, sb.scratch)
    w = os.fork()
    if w == 0:
        try:
            _worker(sb)
        except BaseException as e:                    # setup failed: say so, never run the code
            _setup_failed(sb.status_w, e)
    os.close(sb.out_w)
    os.close(sb.req_r)
    _, status = os.waitpid(w, 0)
    os.write(sb.status_w, (json.dumps({"exit": _describe(status)}) + "\n").encode())
    os._exit(0)


def _supervisor(sb):
    """G: outside the namespace; the zygote kills R through it (R dies with G)."""
    if sb.isolated:
        _check(_libc.unshare(CLONE_NEWPID), "unshare(pid)")
    r = os.fork()
    if r == 0:
        try:
            _init_process(sb)
        except BaseException as e:
            _setup_failed(sb.status_w, e)
    os.write(sb.status_w, (json.dumps({"r": r}) + "\n").encode())
    for fd in (sb.status_w, sb.out_w, sb.req_r):
        os.close(fd)
    os.waitpid(r, 0)
    os._exit(0)


class _Prepared:
    """A sandbox forked and set up before its request arrives, so a request costs one fork
    (W) instead of three plus the namespace and mount work."""

    def __init__(self, isolated, tmpfs_mb):
        self.isolated, self.tmpfs_mb = isolated, tmpfs_mb
        self.status_r, self.status_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.req_r, self.req_w = os.pipe()
        self.scratch = tempfile.mkdtemp(prefix="sandbox-")   # tmpfs is mounted on it when isolated
        self.g = os.fork()
        if self.g == 0:
            try:
                for fd in (self.status_r, self.out_r, self.req_w):
                    os.close(fd)
                _supervisor(self)
            finally:
                os._exit(71)
        for fd in (self.status_w, self.out_w, self.req_r):
            os.close(fd)

    def discard(self):
        os.close(self.req_w)                          # W reads EOF and exits, then R and G
        os.waitpid(self.g, 0)
        for fd in (self.status_r, self.out_r):
            os.close(fd)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _read_ready(fd):
    """Bytes already in the pipe, without blocking (b"" when none or at EOF)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


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


def _serve_one(req, sb):
    """Hand `req` to the prepared sandbox `sb`, watch it, clean up, return the result dict."""
    os.write(sb.req_w, (json.dumps(req) + "\n").encode())
    os.close(sb.req_w)
    status_r, out_r, g, isolated, scratch = sb.status_r, sb.out_r, sb.g, sb.isolated, sb.scratch
    sel = selectors.DefaultSelector()
    sel.register(status_r, selectors.EVENT_READ, "status")
    sel.register(out_r, selectors.EVENT_READ, "out")
    out, buf, msgs = _Capture(req["max_output"]), b"", []
    cell, deadline, timed_out = -1, time.monotonic() + req["timeout"] + 1.0, None
    open_fds = 2
    while open_fds:
        wait = deadline - time.monotonic()
        if wait <= 0:
            timed_out = max(cell, 0)
            break
        for key, _ in sel.select(wait):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
                open_fds -= 1
            elif key.data == "out":
                out.add(data)
            else:
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    msgs.append(msg)
                    if "cell" in msg:
                        cell, deadline = msg["cell"], time.monotonic() + req["timeout"]
        if any("exit" in m for m in msgs):
            break                                     # W is done; daemons may hold the pipes
    r = next((m["r"] for m in msgs if "r" in m), None)
    for pid in (r,) if r else (g,):
        try:
            os.kill(pid, signal.SIGKILL)              # R is PID 1: the whole namespace goes
        except ProcessLookupError:
            pass
    w = next((m["w"] for m in msgs if "w" in m), None)
    if not isolated and w:
        try:
            os.killpg(w, signal.SIGKILL)              # fallback: W's group (W called setsid)
        except (ProcessLookupError, PermissionError):
            pass
    while out_r in sel.get_map() and (data := _read_ready(out_r)):    # what is left in the pipe
        out.add(data)
    sel.close()
    os.close(status_r)
    os.close(out_r)
    os.waitpid(g, 0)                                  # G reaps R, then exits
    try:                                              # the zygote is a child subreaper: orphans
        while os.waitpid(-1, os.WNOHANG)[0] > 0:      # of the fallback mode end up here
            pass
    except ChildProcessError:
        pass
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    done = next((m for m in msgs if m.get("done")), None)
    exit_note = next((m["exit"] for m in msgs if "exit" in m), None)
    if timed_out is not None:
        return {"output": out.text(), "ok": False, "error": f"Timeout after {req['timeout']:g} s",
                "timed_out_cell": timed_out}
    if done is None:
        return {"output": out.text(), "ok": False, "error": exit_note or "Killed by signal 9"}
    error = done["error"] if done["error"] else exit_note
    return {"output": out.text(), "ok": done["ok"] and error is None, "error": error}


def _isolation_available():
    """Probe once, through the real path: does a namespaced sandbox run `pass`?"""
    return os.geteuid() == 0 and _serve_one(dict(DEFAULTS, cells=["pass"]), _Prepared(True, 1))["ok"]


def serve(namespaces=True):
    """Zygote main loop: one JSON request per line on stdin, one JSON result per line out."""
    for name in WARM_IMPORTS:
        try:
            __import__(name)
        except ImportError:
            pass
    try:
        exec(WARM_UP, {})
    except Exception:                                 # numpy or sympy missing: cells import them
        pass
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    gc.collect()
    gc.freeze()             # forked children then copy far fewer pages (no gc writes to them)
    isolated = namespaces and _isolation_available()
    out = sys.stdout
    out.write(json.dumps({"ready": True, "isolated": isolated}) + "\n")
    out.flush()
    ready = _Prepared(isolated, DEFAULTS["tmpfs_mb"])
    for line in sys.stdin:
        req = json.loads(line)
        if ready.tmpfs_mb != req["tmpfs_mb"]:
            ready.discard()
            ready = _Prepared(isolated, req["tmpfs_mb"])
        try:
            res = _serve_one(req, ready)
        except Exception as e:                        # never die on one bad request
            res = {"output": "", "ok": False, "error": f"sandbox error: {e}"}
        out.write(json.dumps(res) + "\n")
        out.flush()
        ready = _Prepared(isolated, req["tmpfs_mb"])  # the next one is built while we wait
    ready.discard()                                   # stdin closed: leave nothing behind


# ---------------------------------------------------------------------------------------
# Client side: a pool of zygotes, run_cells and run_batch
# ---------------------------------------------------------------------------------------
class _Zygote:
    def __init__(self):
        flag = [] if os.environ.get("AUTOCODE_SANDBOX_NAMESPACES", "1") != "0" else ["--no-namespaces"]
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", *flag],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=SAFE_ENV,
                                     start_new_session=True, close_fds=True, text=True)
        hello = json.loads(self.proc.stdout.readline() or '{"isolated": null}')
        self.isolated = hello["isolated"]

    def ask(self, req):
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:                                  # the zygote died: replace it, report
            self.close()
            self.__init__()
            return {"output": "", "ok": False, "error": "sandbox crashed"}
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.close()                   # the zygote cleans up and exits
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


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


def run_cells(cells, timeout=DEFAULTS["timeout"], memory_mb=DEFAULTS["memory_mb"],
              max_output=DEFAULTS["max_output"], file_mb=DEFAULTS["file_mb"],
              max_files=DEFAULTS["max_files"], max_procs=DEFAULTS["max_procs"],
              tmpfs_mb=DEFAULTS["tmpfs_mb"]):
    """Run one solution's code blocks in order; see the module docstring."""
    if isinstance(cells, str):
        cells = [cells]
    if not cells:
        return Result("", True, None)
    note = ""
    while True:
        req = dict(cells=list(cells), timeout=float(timeout), memory_mb=memory_mb, max_output=max_output,
                   file_mb=file_mb, max_files=max_files, max_procs=max_procs, tmpfs_mb=tmpfs_mb)
        z = _acquire()
        try:
            res = z.ask(req)
        finally:
            _idle.put(z)
        i = res.get("timed_out_cell")
        if i is None or i >= len(cells) - 1:
            return Result(note + res["output"], res["ok"], res["error"])
        note = f"(block {i + 1} timed out after {timeout:g} s; state was reset)\n"
        cells = cells[i + 1:]                         # fresh interpreter from the next block


def run_batch(batch, workers=None, **limits):
    """run_cells over many solutions, up to `workers` at once (default: the core count)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda cells: run_cells(cells, **limits), batch))


def main():
    ap = argparse.ArgumentParser(description="Run Python in the sandbox (a quick manual try).")
    ap.add_argument("-c", "--code", action="append", help="a cell; repeat for several cells")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-namespaces", dest="namespaces", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--selftest", action="store_true", help="report which protections are on")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = ap.parse_args()
    if args.serve:
        return serve(args.namespaces)
    if args.selftest:
        print(json.dumps({"isolated_namespaces": isolated(), "root": os.geteuid() == 0}))
        return
    limits = {k: getattr(args, k) for k in DEFAULTS}
    t = time.perf_counter()
    res = run_cells(args.code or ["print(1+1)"], **limits)
    print(res.output, end="" if res.output.endswith("\n") else "\n")
    print(f"[ok={res.ok} error={res.error} {1000 * (time.perf_counter() - t):.1f} ms]", file=sys.stderr)


if __name__ == "__main__":
    main()
