"""Adversarial and faulty snippets against the sandbox, table-driven. Each row asserts the
exact outcome, a time bound, and (checked by listing processes) that nothing was left
running. Namespace-only guarantees are skipped where the OS does not allow namespaces."""
import os
import socket
import time

import pytest

import sandbox

T = 1.0   # timeout used in these tests (seconds)
ISOLATED = sandbox.isolated()
needs_ns = pytest.mark.skipif(not ISOLATED, reason="needs root / namespaces")


def all_pids():
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def parents():
    out = {}
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            pass
    return out


def sandbox_processes():
    """pid -> ppid of the processes the sandbox started for THIS test process: below one of
    our zygotes, or carrying our tag in their environment (orphans that left the tree).
    Nothing else on the machine counts, however many processes come and go meanwhile."""
    tag = f"{getattr(sandbox, 'TAG', 'AUTOCODE_SANDBOX_TAG')}={os.getpid()}\0".encode()
    zygotes = {z.proc.pid for z in sandbox._all}
    ppid = parents()
    ours = {}
    for pid, pp in ppid.items():
        p, hops = pid, 0
        while p in ppid and p not in zygotes and hops < 64:
            p, hops = ppid[p], hops + 1
        tagged = False
        if p not in zygotes:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    tagged = tag in f.read()
            except OSError:
                pass
        if p in zygotes or tagged:
            ours[pid] = pp
    return ours, zygotes


def leftovers(before=None):
    """Our processes other than the zygotes and each zygote's one prepared sandbox (G -> R ->
    W, waiting for a request). A killed process can take a moment to go: look for a second."""
    for _ in range(20):
        time.sleep(0.05)
        ours, zygotes = sandbox_processes()
        allowed = set(zygotes)
        for z in zygotes:
            p = z
            for _ in range(3):
                kids = [k for k, pp in ours.items() if pp == p]
                if len(kids) != 1:
                    break
                p = kids[0]
                allowed.add(p)
        extra = set(ours) - allowed
        if not extra:
            return {}
    return {p: open(f"/proc/{p}/stat").read()[:60] for p in extra if os.path.exists(f"/proc/{p}")}


# (name, cells, expected ok, error prefix or None, text expected in output or None, max seconds)
CASES = [
    ("print", ["print(1+1)"], True, None, "2\n", 1),
    ("zero division", ["1/0"], False, "ZeroDivisionError: division by zero", "ZeroDivisionError", 1),
    ("syntax error", ["def f(:\n  pass"], False, "SyntaxError", None, 1),
    ("name error", ["print(undefined_name)"], False, "NameError", None, 1),
    ("infinite loop", ["while True: pass"], False, "Timeout after 1 s", None, T + 0.5),
    ("C loop", ["sum(range(10**12))"], False, "Timeout after 1 s", None, T + 0.5),
    ("ignores signals", ["import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):\n"
                         "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass"], False, "Timeout", None, T + 0.5),
    ("swallows exceptions", ["import time\nwhile True:\n    try:\n        time.sleep(10)\n"
                             "    except BaseException:\n        pass"], False, "Timeout", None, T + 0.5),
    ("huge bytearray", ["x = bytearray(10**11)"], False, "MemoryError", None, 1),
    ("huge list", ["x = [0] * (10**10)"], False, "MemoryError", None, 1),
    ("huge numpy", ["import numpy as np\nx = np.zeros((10**6, 10**6))"], False, None, "MemoryError", 1),
    ("numpy and sympy work", ["import numpy as np, sympy as sp\nx = sp.symbols('x')\n"
                              "print(sp.solve(x**2 - 4, x), int(np.arange(10).sum()))"], True, None, "[-2, 2] 45", 1),
    ("endless printing", ["while True: print('spam' * 50)"], False, "Timeout", "bytes cut", T + 0.5),
    ("one huge print", ["print('a' * 10**7)"], True, None, "bytes cut", 2),
    ("bounded fork tree", ["import os, time\nfor _ in range(5):\n    os.fork()\ntime.sleep(100)"], False,
     "Timeout", None, T + 0.5),
    ("subprocess left running", ["import subprocess\nsubprocess.Popen(['sleep', '1000'])\nprint('ok')"],
     True, None, "ok", 1),
    ("thread left running", ["import threading, time\nthreading.Thread(target=time.sleep, args=(1000,)).start()\n"
                             "print('ok')"], True, None, "ok", 1),
    ("exit code", ["exit(3)"], False, "Exited with code 3", None, 1),
    ("os._exit", ["import os\nos._exit(5)"], False, "Exited with code 5", None, 1),
    ("clean exit", ["import sys\nprint('bye')\nsys.exit(0)"], True, None, "bye", 1),
    ("segfault", ["import ctypes\nctypes.string_at(0)"], False, "Killed by signal 11", None, 1),
    ("kills its parent", ["import os\nos.kill(os.getppid(), 9)\nprint('still here')"], None, None, None, 1),
    ("kills its group", ["import os\nos.killpg(0, 9)"], False, "Killed by signal 9", None, 1),
    ("huge integer prints", ["print(len(str(10**5000)))"], True, None, "5001", 1),
    ("file size limit", ["open('big', 'wb').write(b'x' * (20 << 20))"], False, "OSError", None, 2),
    ("open file limit", ["fs = [open('/dev/null') for _ in range(1000)]"], False, "OSError", None, 1),
    ("stdin is empty", ["input()"], False, "EOFError", None, 1),
    ("keyboard interrupt", ["raise KeyboardInterrupt"], False, "KeyboardInterrupt", None, 1),
    ("notebook state", ["x = 3", "y = x * 2", "print(x + y)"], True, None, "9", 1),
    ("earlier output hidden", ["print('hidden')", "print('shown')"], True, None, "shown", 1),
    ("last expression shown", ["a = 2", "a ** 10"], True, None, "1024", 1),
    ("earlier error keeps state", ["z = 1\n1/0", "print(z)"], True, None, "1", 1),
    # an earlier block's exit ends that block only: the later blocks ran as "ok" unrun before
    ("earlier exit() ends its block", ["z = 1\nexit()", "print(z + 1)"], True, None, "2", 1),
    ("earlier sys.exit(3), later error", ["import sys\nsys.exit(3)", "1/0"], False, "ZeroDivisionError", None, 1),
    # ...but a child an earlier block forked ends with that block (it ran the rest, and reported)
    ("a forked child's exit", ["import os, sys\nif os.fork() == 0:\n    sys.exit(0)\nos.wait()", "print('x')"],
     True, None, "x", 1),
    ("a forked child's error", ["import os\nif os.fork() == 0:\n    1/0\nos.wait()", "print('x')"], True, None, "x", 1),
    ("timeout resets state", ["a = 1", "while True: pass", "print(a)"], False, "NameError", "timed out", T + 1.5),
    ("the note counts every block", ["a = 1", "while True: pass", "b = 2", "while True: pass", "print(b)"], False,
     "NameError", "(block 4 timed out", 2 * T + 2.5),
]


@pytest.mark.parametrize("name,cells,ok,error,text,seconds", CASES, ids=[c[0] for c in CASES])
def test_snippet(name, cells, ok, error, text, seconds):
    sandbox.run_cells(["pass"])               # warm the pool outside the timing
    before = all_pids()
    t = time.monotonic()
    res = sandbox.run_cells(cells, timeout=T)
    elapsed = time.monotonic() - t
    assert elapsed <= seconds, f"{name}: took {elapsed:.2f}s"
    if ok is not None:
        assert res.ok is ok, res
    if error is None and ok:
        assert res.error is None, res
    elif error is not None:
        assert res.error is not None and res.error.startswith(error), res
    if text is not None:
        assert text in res.output, res
    assert len(res.output) < 20000 + 200
    assert not leftovers(before), f"{name}: processes left running"
    assert sandbox.run_cells(["print('alive')"]).output == "alive\n"     # the caller survived


def test_parent_kill_does_not_reach_caller():
    res = sandbox.run_cells(["import os\nos.kill(os.getppid(), 9)\nos.killpg(os.getpgid(0), 9)"], timeout=T)
    assert res.ok is False
    assert sandbox.run_cells(["print(7)"]).output == "7\n"


@needs_ns
def test_daemon_that_calls_setsid_is_killed():
    before = all_pids()
    res = sandbox.run_cells(["import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                             "        time.sleep(1000)\n    os._exit(0)\nprint('parent done')"], timeout=T)
    assert res.output == "parent done\n"
    assert not leftovers(before)


@needs_ns
def test_no_file_left_outside_the_sandbox(tmp_path):
    marker = f"autocode_leak_{os.getpid()}"
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", str(tmp_path / marker),
               os.path.expanduser(f"~/{marker}"), os.path.join(os.getcwd(), marker)]
    code = "import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n" \
           "open('here', 'w').write('x')\nprint(sorted(os.listdir('.')))" % (targets,)
    res = sandbox.run_cells([code], timeout=T)
    assert "here" in res.output
    assert [p for p in targets if os.path.exists(p)] == []


@needs_ns
def test_environment_and_parent_environ_are_scrubbed(monkeypatch):
    monkeypatch.setenv("AUTOCODE_TEST_SECRET", "hunter2")
    sandbox.shutdown()                        # new zygotes, started while the secret is set
    code = ("import os\nprint(dict(os.environ))\n"
            "for pid in [os.getppid(), 1, %d]:\n    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
            "    except OSError as e:\n        print('denied', pid)" % os.getpid())
    res = sandbox.run_cells([code], timeout=T)
    assert res.ok and "hunter2" not in res.output and f"denied {os.getpid()}" in res.output


@needs_ns
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    res = sandbox.run_cells([f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5)"],
                            timeout=T)
    server.close()
    assert res.ok is False and res.error.split(":")[0] in ("OSError", "ConnectionRefusedError", "TimeoutError")


def test_batch_keeps_order_and_separates_state():
    batch = [[f"x = {i}", "print(x)"] for i in range(12)] + [["print(globals().get('x'))"]]
    results = sandbox.run_batch(batch, timeout=T)
    assert [r.output for r in results] == [f"{i}\n" for i in range(12)] + ["None\n"]


def test_cli(capsys):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "sandbox.py", "-c", "print(6*7)"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout == "42\n" and "ok=True" in out.stderr


@pytest.fixture(scope="module")
def fallback():
    """The sandbox without namespaces, as a non-root user gets it (as root, which needs the
    explicit AUTOCODE_SANDBOX_ROOT_FALLBACK=1: the cells as a drawn uid where other users can
    reach the interpreter, else as uid 0 without capabilities)."""
    os.environ["AUTOCODE_SANDBOX_NAMESPACES"] = "0"
    os.environ["AUTOCODE_SANDBOX_ROOT_FALLBACK"] = "1"
    sandbox.shutdown()
    yield
    del os.environ["AUTOCODE_SANDBOX_NAMESPACES"]
    del os.environ["AUTOCODE_SANDBOX_ROOT_FALLBACK"]
    sandbox.shutdown()


@pytest.mark.parametrize("name,cells,ok,error,text,seconds", CASES, ids=[c[0] for c in CASES])
def test_fallback_snippet(fallback, name, cells, ok, error, text, seconds):
    assert sandbox.isolated() is False
    test_snippet(name, cells, ok, error, text, seconds)


def test_fallback_removes_its_directory(fallback):
    res = sandbox.run_cells(["import os\nopen('f', 'w').write('x')\nprint(os.getcwd())"], timeout=T)
    end = time.monotonic() + 1                        # removed right after the answer is sent
    while os.path.exists(res.output.strip()) and time.monotonic() < end:
        time.sleep(0.02)
    assert res.ok and not os.path.exists(res.output.strip())


def test_others_can_enter_only_where_every_directory_above_lets_them():
    import tempfile
    top = tempfile.mkdtemp(dir="/tmp")                # /tmp: anyone may enter
    inner = os.path.join(top, "lib", "python")
    os.makedirs(inner)
    try:
        os.chmod(top, 0o755)
        assert sandbox._others_can_enter([inner, "/usr"])
        os.chmod(top, 0o700)                          # a pyenv under /root
        assert not sandbox._others_can_enter([inner]) and not sandbox._others_can_enter(["/usr", inner])
    finally:
        os.chmod(top, 0o700)
        import shutil
        shutil.rmtree(top)


def test_root_fallback_cells_take_a_drawn_uid_where_the_interpreter_is_reachable(fallback):
    """By default (AUTOCODE_SANDBOX_FALLBACK_UID unset) the root fallback's cells run as a drawn
    uid exactly where other users can reach the interpreter, else as uid 0 (FALLBACK_GAPS)."""
    if os.geteuid() != 0:
        pytest.skip("only root can run the cells as another uid")
    z = sandbox._acquire()
    sandbox._idle.put(z)
    reachable = sandbox._others_can_enter(sandbox._interpreter_dirs())
    uid = int(sandbox.run_cells(["import os\nprint(os.getuid())"]).output)
    lo, hi = sandbox.HOST_UID_RANGE
    assert z.fallback_uid is reachable
    assert (lo <= uid < hi or uid == sandbox.SANDBOX_ID) if reachable else uid == 0


def test_remove_scratch_survives_what_a_cell_can_leave(tmp_path):
    """A tree 3,000 levels deep (past Python's recursion and PATH_MAX), FIFOs (opening one
    blocks), links out of it (their targets stay), and a FIFO or a link in place of the
    directory itself."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.mkfifo(scratch / "fifo")
    os.symlink(outside, scratch / "link")
    fd = os.open(scratch, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("a", dir_fd=fd)
        fd, old = os.open("a", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.mkfifo("fifo", dir_fd=fd)
    os.symlink(outside, "link", dir_fd=fd)
    os.close(fd)
    sandbox.remove_scratch(str(scratch))
    assert not os.path.lexists(scratch) and os.listdir(outside) == ["keep"]
    for make in (os.mkfifo, lambda p: os.symlink(outside, p)):
        make(scratch)
        sandbox.remove_scratch(str(scratch))
        assert not os.path.lexists(scratch) and os.listdir(outside) == ["keep"]


def test_remove_scratch_as_the_user_who_left_directories_at_mode_000():
    """Without root (the fallback of a non-root user) a directory at mode 000 could not be
    opened: its tree stayed, and every later sweep spent its whole patience on it."""
    import pathlib
    import shutil
    import tempfile
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    parent = pathlib.Path(tempfile.mkdtemp(dir="/tmp"))     # pytest's tmp_path: mode 700, root's
    top = parent / "scratch"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    for p in (top, top / "a", top / "a" / "b", top / "a" / "b" / "f"):
        os.chown(p, sandbox.SANDBOX_ID, sandbox.SANDBOX_ID)
    os.chmod(top / "a" / "b", 0)
    os.chmod(top / "a", 0)
    os.chmod(parent, 0o777)
    pid = os.fork()
    if pid == 0:                                      # the child: that user, no privileges
        try:
            os.setgroups([])
            os.setgid(sandbox.SANDBOX_ID)
            os.setuid(sandbox.SANDBOX_ID)
            sandbox.remove_scratch(str(top), patience=1.0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    removed = not os.path.lexists(top)
    shutil.rmtree(parent)
    assert removed


def test_the_scratch_sweep_stops_at_its_time_budget(monkeypatch, tmp_path):
    """Thousands of leftovers a cell made to look like dead zygotes' scratch directories must not
    hold a zygote's start past its caller's hello deadline: the sweep takes 4 x patience in all."""
    for i in range(50):
        (tmp_path / f"autocode-sandbox-999999999-x{i}").mkdir()
    monkeypatch.setattr(sandbox, "SCRATCH_PARENT", str(tmp_path))
    monkeypatch.setattr(sandbox, "_cgroup_bases", lambda: None)
    calls = []
    monkeypatch.setattr(sandbox, "remove_scratch", lambda path, patience: calls.append(time.sleep(0.05)))
    sandbox.sweep_cgroups(patience=0.05)
    assert 1 <= len(calls) <= 6, len(calls)
