"""The host side never runs, loads or follows what a kernel may write (issue 9). Each test
performs an attack a kernel (or a kernel racing another) made on an earlier main, on every
way a kernel starts, and checks that it fails while the legitimate use beside it works."""
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from conftest import ATTEMPT, start_kernel, start_path_spec, start_paths, stop_kernel, wait_until

PATHS = start_paths("trust")
SHARED_HOME = start_paths("trust-shared", ["--home=shared"])

ATTACKS = "import os\n" + ATTEMPT + """home = {home!r}
def write(path, text="x"):
    with open(path, "a") as f:
        f.write(text)
attempt("read-key", lambda: open(home + "/.ssh/id_ed25519").read())
attempt("bashrc", lambda: write(home + "/.bashrc", "echo pwned\\n"))
attempt("authorized_keys", lambda: write(home + "/.ssh/authorized_keys"))
attempt("new-dotfile", lambda: write(home + "/.profile"))
attempt("jupyter-config", lambda: write(home + "/.jupyter/ns_kernel_config.py"))
attempt("kernelspec", lambda: (os.makedirs(home + "/.local/share/jupyter/kernels/isolated-python",
                                           exist_ok=True),
                               write(home + "/.local/share/jupyter/kernels/isolated-python/kernel.json")))
attempt("home-bin", lambda: write(home + "/bin/ls"))
attempt("notebooks", lambda: write(home + "/notebooks/out.txt", "ok"))
attempt("existing-file", lambda: write(home + "/results.csv", "3,4\\n"))
attempt("new-top-file", lambda: write(home + "/new.csv"))
print("HOME", os.environ["HOME"], os.access(os.environ["HOME"], os.W_OK))
"""


@pytest.fixture
def fake_home(tmp_path):
    """A home as JupyterLab's users have one: keys, shell and Jupyter settings, ~/bin, a
    notebooks folder and a file beside it; writable by the sandbox's uid where the user's
    own kernel could write (root's runs as nobody)."""
    home = tmp_path / "home"
    for d in (".ssh", ".jupyter", ".local/share/jupyter/kernels", "bin", "notebooks"):
        (home / d).mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("SECRET KEY")
    (home / ".bashrc").write_text("# rc\n")
    (home / "results.csv").write_text("1,2\n")
    for path in [home, *home.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    tmp_path.chmod(0o755)
    return home


def results(out):
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def attack_home(cwd, kernel_name, home):
    """ATTACKS from a kernel started in cwd with `home` as the server's $HOME: what each
    attempt met, and the whole output."""
    k = start_kernel(cwd, kernel_name=kernel_name, env={"HOME": home})
    try:
        out, error, _ = k.execute(ATTACKS.format(home=home))
    finally:
        stop_kernel(k)
    assert error is None, out
    return results(out), out


def assert_home_untouched(home):
    assert (home / ".bashrc").read_text() == "# rc\n"
    assert not (home / ".ssh" / "authorized_keys").exists()
    assert not (home / ".profile").exists()
    assert not (home / ".jupyter" / "ns_kernel_config.py").exists()
    assert os.listdir(home / ".local" / "share" / "jupyter" / "kernels") == []
    assert os.listdir(home / "bin") == []
    assert not (home / "new.csv").exists()


@pytest.mark.parametrize("path", PATHS)
def test_notebook_in_the_home_folder_cannot_touch_the_hosts_settings(fake_home, path):
    # JupyterLab's root is usually ~, so ~/Untitled.ipynb runs with the home as its folder.
    home = str(fake_home)
    seen, out = attack_home(home, PATHS[path], home)
    for attack in ("read-key", "bashrc", "authorized_keys", "new-dotfile", "jupyter-config",
                   "kernelspec", "home-bin"):
        assert seen[attack] != "ALLOWED", (attack, out)
    assert seen["read-key"] == "FileNotFoundError"      # dot entries are not there at all
    # The user's own files stay theirs to change; a new file at the top gets a clear error.
    assert seen["notebooks"] == "ALLOWED" and seen["existing-file"] == "ALLOWED"
    assert seen["new-top-file"] == "OSError"
    assert seen["HOME"] == f"{home}/.isolated-home True"
    assert (fake_home / "notebooks" / "out.txt").read_text() == "ok"
    assert (fake_home / "results.csv").read_text() == "1,2\n3,4\n"
    assert_home_untouched(fake_home)


@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_shared_home_shares_files_not_settings(fake_home, workdir, path):
    home = str(fake_home)
    seen, out = attack_home(workdir, SHARED_HOME[path], home)
    for attack in ("read-key", "bashrc", "authorized_keys", "new-dotfile", "jupyter-config",
                   "kernelspec", "home-bin", "new-top-file"):
        assert seen[attack] != "ALLOWED", (attack, out)
    assert seen["notebooks"] == "ALLOWED" and seen["existing-file"] == "ALLOWED"
    assert seen["HOME"] == f"{home} False"
    assert_home_untouched(fake_home)


def attack(path, cwd, code, env=None, options=()):
    """Run `code` (ATTEMPT lines) in a kernel started in cwd on start path `path` (or as
    `ns-kernel run`'s Python, with `options`): what each attempt met."""
    code = ATTEMPT + code
    if path == "run":
        done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", *options, "--",
                               sys.executable, "-c", code], cwd=cwd, capture_output=True,
                              text=True, timeout=60, env={**os.environ, **(env or {})})
        assert done.returncode == 0, done.stderr
        return results(done.stdout), done.stdout
    with tempfile.TemporaryFile("w+") as log:
        try:
            k = start_kernel(str(cwd), kernel_name=PATHS[path], env=env, stderr=log)
        except RuntimeError as exc:     # with what the launcher said, for the test to read
            log.seek(0)
            raise RuntimeError(f"{exc}: {log.read()}") from None
    try:
        out, error, _ = k.execute(code)
    finally:
        stop_kernel(k)
    assert error is None, out
    return results(out), out


def failed_start(path, cwd, env):
    """What a start on `path` that must fail said (the server log's, or run's stderr)."""
    env = {**os.environ, **env}
    if path == "run":
        proc = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--", "/bin/true"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        return proc.stderr
    from jupyter_client.manager import KernelManager
    log = os.path.join(cwd, "..", f"server-{path}.log")
    km = KernelManager(kernel_name=PATHS[path])
    with open(log, "w") as stderr:
        km.start_kernel(cwd=str(cwd), env=env, stderr=stderr)
        try:
            assert wait_until(lambda: not km.is_alive(), timeout=30)
        finally:
            km.shutdown_kernel(now=True)
    with open(log) as f:
        return f.read()


def shared_folder(tmp_path, *dirs):
    """A notebook folder, with dirs in it, that the sandbox's uid may write (nobody, as
    root): as a kernel of the user's own could."""
    tmp_path.chmod(0o755)
    folder = tmp_path / "notebooks"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    for d in dirs:
        path = folder
        for part in d.split("/"):
            path /= part
            path.mkdir(mode=0o777, exist_ok=True)
            path.chmod(0o777)
    return folder


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_what_the_host_imports_below_the_folder_cannot_be_moved_away(tmp_path, path):
    # Attack: the launcher imports from <folder>/src/lib (PYTHONPATH), bound read-only;
    # the kernel renames src, which merely holds that mount, makes a fresh src/lib with a
    # sitecustomize.py, and the next start runs it on the host, with the server's rights.
    folder = shared_folder(tmp_path, "src/lib")
    lib = folder / "src" / "lib"
    seen, out = attack(path, folder, f"""import os
attempt("rename", lambda: os.rename("src", "src.old"))
attempt("remove", lambda: os.rmdir("src"))
attempt("exchange", lambda: os.rename("src/lib", "lib.old"))
def plant():
    os.makedirs("src/lib", exist_ok=True)
    with open("src/lib/sitecustomize.py", "w") as f:
        f.write("open({str(tmp_path / 'ran')!r}, 'w').close()\\n")
attempt("plant", plant)
attempt("beside", lambda: open("src/other.py", "w").close())
""", env={"PYTHONPATH": str(lib)})
    for what in ("rename", "remove", "exchange", "plant"):
        assert seen[what] in ("OSError", "PermissionError"), (what, out)
    assert seen["beside"] == "ALLOWED", out      # the rest of the folder stays writable
    assert os.listdir(lib) == [] and not (folder / "src.old").exists()


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_a_search_path_entry_the_kernel_could_create_is_refused(tmp_path, path):
    folder = shared_folder(tmp_path)
    said = failed_start(path, folder, {"PYTHONPATH": str(folder / "src" / "lib")})
    lines = [line for line in said.splitlines() if line.startswith("ns-kernel:")]
    assert len(lines) == 1, said
    assert f"sys.path entry {folder}/src/lib does not exist" in lines[0], said
    assert "the kernel could create it" in lines[0]
    assert not (folder / "src").exists()


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_the_notebook_folders_git_is_read_only_and_stays_in_place(tmp_path, path):
    # Attack: .git/hooks and .git/config were read-only, .git was not: the kernel renamed
    # it and put a copy with core.fsmonitor in its place, which the user's next
    # `git status` on the host ran. Or .git/commondir, naming a config of its own.
    folder = shared_folder(tmp_path)
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    for d, _, files in os.walk(folder / ".git"):
        os.chmod(d, 0o777)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666)
    before = os.stat(folder / ".git").st_ino
    seen, out = attack(path, folder, """import os, subprocess
def write(path, text="x"):
    with open(path, "a") as f:
        f.write(text)
attempt("hook", lambda: write(".git/hooks/pre-commit", "#!/bin/sh\\necho pwned\\n"))
attempt("config", lambda: write(".git/config", "[core]\\n\\tfsmonitor = touch pwned\\n"))
attempt("commondir", lambda: write(".git/commondir", "../elsewhere"))
attempt("index", lambda: write(".git/index"))
attempt("rename", lambda: os.rename(".git", ".git.old"))
attempt("remove", lambda: os.rmdir(".git"))
attempt("git-status", lambda: subprocess.run(["git", "status"], check=True,
                                             capture_output=True))
""")
    for what in ("hook", "config", "commondir", "index", "rename", "remove"):
        assert seen[what] in ("OSError", "PermissionError"), (what, out)
    assert seen["git-status"] == "ALLOWED", out      # git reads it as it is
    assert os.stat(folder / ".git").st_ino == before
    assert not (folder / ".git" / "commondir").exists()
    assert not (folder / ".git" / "hooks" / "pre-commit").exists()


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_the_repositories_below_the_folder_are_read_only_and_stay_in_place(tmp_path, path):
    # A notebook in the home (JupyterLab's default root) has the user's projects below it:
    # their hooks and config are what git on the host runs at the user's next commit.
    folder = shared_folder(tmp_path, "code/proj")
    subprocess.run(["git", "init", "-q", str(folder / "code" / "proj")], check=True)
    os.chmod(folder / "code" / "proj" / ".git" / "hooks", 0o777)
    seen, out = attack(path, folder, """import os
attempt("hook", lambda: open("code/proj/.git/hooks/post-checkout", "w").write("echo pwned"))
attempt("rename-repo", lambda: os.rename("code/proj", "code/proj.old"))
attempt("rename-parent", lambda: os.rename("code", "code.old"))
attempt("work-tree", lambda: open("code/proj/notes.txt", "w").write("mine"))
""")
    for what in ("hook", "rename-repo", "rename-parent"):
        assert seen[what] in ("OSError", "PermissionError"), (what, out)
    assert seen["work-tree"] == "ALLOWED", out      # the project's files stay writable
    assert not (folder / "code" / "proj" / ".git" / "hooks" / "post-checkout").exists()


# A process and all it starts on a Linux without Landlock, as far as ns_kernel can tell:
# landlock_create_ruleset answers ENOSYS (as under a container runtime's older profile).
# argv: kernelspec name (or "run"), folder, code; prints what the kernel printed.
WITHOUT_LANDLOCK = """import errno, os, sys
from ns_kernel import seccomp, syscalls, warm
syscalls.set_no_new_privs()
seccomp.load(seccomp.Filter(seccomp.SCMP_ACT_ALLOW, (seccomp.Rule(
    ("landlock_create_ruleset",), seccomp.SCMP_ACT_ERRNO(errno.ENOSYS)),)))
name, folder, code = sys.argv[1:]
if name == "run":
    os.chdir(folder)
    os.execv(sys.executable, [sys.executable, "-P", "-m", "ns_kernel", "run", "--",
                              sys.executable, "-c", code])
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=name)
km.start_kernel(cwd=folder)
kc = km.client()
kc.start_channels()
try:
    kc.wait_for_ready(timeout=60)
    def show(msg):
        if msg["msg_type"] == "stream":
            print(msg["content"]["text"], end="")
    kc.execute_interactive(code, timeout=30, output_hook=show)
finally:
    kc.stop_channels()
    km.shutdown_kernel()
    warm.stop(warm.socket_path())
"""


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_without_landlock_the_seccomp_filter_keeps_links_out(tmp_path, path):
    folder = shared_folder(tmp_path)
    # A template of its own, started without Landlock; a short path, for its socket.
    runtime = tempfile.mkdtemp(prefix="nsk-")
    code = ATTEMPT + """import os
attempt("symlink", lambda: os.symlink("/etc", "link"))
attempt("symlink-var-tmp", lambda: os.symlink("/etc", "/var/tmp/link"))
attempt("file", lambda: open("notes.txt", "w").close())
"""
    try:
        # (From tmp_path: `-c` puts its working directory first on sys.path.)
        done = subprocess.run([sys.executable, "-c", WITHOUT_LANDLOCK, PATHS.get(path, path),
                               str(folder), code], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env={**os.environ, "XDG_RUNTIME_DIR": runtime})
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    seen = results(done.stdout)
    # Denied everywhere now, the sandbox's own /var/tmp too: EPERM, not Landlock's EACCES.
    assert seen == {"symlink": "PermissionError", "symlink-var-tmp": "PermissionError",
                    "file": "ALLOWED"}, done.stdout
    assert sorted(os.listdir(folder)) == ["notes.txt"]


LINKS = """import os
attempt("symlink", lambda: os.symlink({target!r}, ".ipynb_checkpoints"))
attempt("symlink-rw-bind", lambda: os.symlink({target!r}, {rw!r} + "/link"))
attempt("fifo", lambda: os.mkfifo("notes.ipynb"))
attempt("move-users-link", lambda: os.rename("users-link", "checkpoint-link"))
attempt("link-users-link", lambda: os.link("users-link", "another", follow_symlinks=False))
attempt("symlink-var-tmp", lambda: os.symlink("/etc/hostname", "/var/tmp/link"))
attempt("fifo-var-tmp", lambda: os.mkfifo("/var/tmp/fifo"))
attempt("move-in-a-link", lambda: os.rename("/var/tmp/link", "moved-link"))
attempt("move-own-file", lambda: (open("a.txt", "w").close(), os.mkdir("sub"),
                                  os.rename("a.txt", "sub/a.txt")))
attempt("read-users-link", lambda: os.readlink("users-link"))
"""


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_a_kernel_makes_no_links_where_the_host_reads(tmp_path, path):
    # Attack: the kernel made .ipynb_checkpoints a link into a dot dir of the home: saving
    # a file in JupyterLab made the server copy a kernel-written file there. A link to a
    # key: the server's checkpoint copied the key into the folder. The folders the host
    # reads (the notebook folder, --rw-bind sources) take no links and no FIFOs.
    folder = shared_folder(tmp_path)
    rw = tmp_path / "scratch"
    rw.mkdir(mode=0o777)
    rw.chmod(0o777)
    os.symlink("/etc/hostname", folder / "users-link")      # the user's own stays as it is
    options = ("--rw-bind", str(rw))
    if path == "run":
        seen, out = attack(path, folder, LINKS.format(target=str(tmp_path), rw=str(rw)),
                           options=options)
    else:
        name = start_path_spec(f"trust-links-{path}", path, options)
        k = start_kernel(str(folder), kernel_name=name)
        try:
            out, error, _ = k.execute(ATTEMPT + LINKS.format(target=str(tmp_path), rw=str(rw)))
        finally:
            stop_kernel(k)
        assert error is None, out
        seen = results(out)
    for what in ("symlink", "symlink-rw-bind", "fifo", "move-users-link", "link-users-link"):
        assert seen[what] == "PermissionError", (what, out)
    # Another mount: EXDEV (and `mv` would copy it: a new link, denied).
    assert seen["move-in-a-link"] == "OSError", out
    # The sandbox's own filesystems take them, as programs there expect; files move
    # between dirs as in a plain kernel.
    assert seen["symlink-var-tmp"] == seen["fifo-var-tmp"] == "ALLOWED", out
    assert seen["read-users-link"] == seen["move-own-file"] == "ALLOWED", out
    assert sorted(os.listdir(folder)) == ["sub", "users-link"] and os.listdir(rw) == []


@pytest.mark.parametrize("path", PATHS)
def test_the_socket_dir_is_sealed_once_the_kernel_runs(workdir, path, tmp_path):
    # A host Unix socket the kernel must never get the launcher or the client to reach.
    tmp_path.chmod(0o755)
    target = socket.socket(socket.AF_UNIX)
    target.bind(str(tmp_path / "host.sock"))
    target.listen()
    k = start_kernel(workdir, kernel_name=PATHS[path])
    try:
        out, error, _ = k.execute(
            "import os, socket\n"
            "def attempt(what, action):\n"
            "    try:\n"
            "        action()\n"
            "        print(what, 'ALLOWED')\n"
            "    except OSError as exc:\n"
            "        print(what, type(exc).__name__)\n"
            "d = '/run/ns-kernel'\n"
            "k = sorted(n for n in os.listdir(d) if n.startswith('k-'))[0]\n"
            "attempt('rename', lambda: os.rename(f'{d}/{k}', f'{d}/old'))\n"
            f"attempt('link', lambda: os.symlink({str(tmp_path / 'host.sock')!r}, f'{{d}}/x'))\n"
            "attempt('fill', lambda: open(f'{d}/big', 'wb').write(b'x' * 4096))\n"
            "attempt('mkdir', lambda: os.mkdir(f'{d}/sub', 0))\n"
            "attempt('unlink', lambda: os.unlink(f'{d}/{k}'))\n")
        assert error is None, out
        assert k.value("6 * 7") == 42      # the client's paths still reach the kernel
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        assert k.value("6 * 7") == 42
    finally:
        stop_kernel(k)
        target.close()
    seen = results(out)
    for attack in ("rename", "link", "fill", "mkdir", "unlink"):
        assert seen[attack] == "OSError", out


def test_the_bridge_connects_only_to_the_kernels_own_socket(tmp_path):
    # What the bridge would meet if a kernel had swapped its socket for a link to a host
    # socket before the seal: it must not relay to it.
    from ns_kernel.bridge import kernel_socket
    tmp_path.chmod(0o755)
    host = socket.socket(socket.AF_UNIX)
    host.bind(str(tmp_path / "host.sock"))
    host.listen()
    os.symlink(tmp_path / "host.sock", tmp_path / "k-1234")
    # A monitor of another sandbox: its children get a PID namespace of their own.
    other = subprocess.Popen(["unshare", "--user", "--map-root-user", "--pid", "--fork", "sleep",
                              "60"])
    try:
        # (The namespace can be looked at once its first process, sleep, is there.)
        def made():
            try:
                return os.stat(f"/proc/{other.pid}/ns/pid_for_children").st_ino != \
                    os.stat("/proc/self/ns/pid").st_ino
            except FileNotFoundError:
                return False
        assert wait_until(made)
        assert kernel_socket(str(tmp_path / "k-1234"), os.getpid()) is None   # a link
        # A real socket, but its listener is outside that sandbox's PID namespace.
        assert kernel_socket(str(tmp_path / "host.sock"), other.pid) is None
        # The same socket is accepted where its listener does live (the check can pass).
        sock = kernel_socket(str(tmp_path / "host.sock"), os.getpid())
        assert sock is not None
        sock.close()
    finally:
        other.kill()
        other.wait()
        host.close()


# -- refused folders ----------------------------------------------------------------------

def run_in(cwd, *args, env=None):
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", *args, "--",
                           "/bin/true"], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    return done.returncode, done.stderr.strip().splitlines()


@pytest.mark.parametrize("folder, fragment", [
    ("/tmp", "every user may write it"),
    ("/dev/shm", "every user may write it"),
    ("/home", "it holds /home/"),
])
def test_folders_shared_by_every_user_are_refused(folder, fragment):
    if not os.path.isdir(folder):
        pytest.fail(f"{folder} is missing on this machine")
    code, lines = run_in(folder)
    assert code != 0
    errors = [line for line in lines if line.startswith("ns-kernel:")]
    assert len(errors) == 1 and fragment in errors[0], lines
    assert "start Jupyter from" in errors[0]


def test_a_folder_inside_jupyters_settings_is_refused(tmp_path):
    config = tmp_path / "jupyter-config"
    (config / "nb").mkdir(parents=True)
    code, lines = run_in(config / "nb", env={"JUPYTER_CONFIG_DIR": str(config)})
    assert code != 0
    assert lines[-1].startswith(f"ns-kernel: working directory {config / 'nb'}")
    assert f"it lies in {config}, which Jupyter or IPython on the host reads" in lines[-1]


# -- a kernel racing another's start --------------------------------------------------------

RENAME_EXCHANGE = 2


@pytest.mark.parametrize("how", ["notebook folder", "--ro-bind"])
def test_a_folder_swapped_for_a_link_while_a_kernel_starts_is_never_mounted(tmp_path, how):
    """A kernel whose folder holds another kernel's folder (or the source of another
    kernel's --ro-bind) swaps it with a link to / in a loop while the other starts: each
    start either refuses, naming the race or the link, or mounts the real folder; never
    the host's /."""
    tmp_path.chmod(0o755)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o777)
    (victim / "marker").write_text("the real folder")
    (victim / "marker").chmod(0o644)
    os.symlink("/", tmp_path / "swap")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    libc = ctypes.CDLL(None, use_errno=True)
    stop = threading.Event()

    def swap():
        a, b = str(victim).encode(), str(tmp_path / "swap").encode()
        while not stop.is_set():
            libc.renameat2(-100, a, -100, b, RENAME_EXCHANGE)

    if how == "notebook folder":
        # The launcher starts in the real folder (its cwd is the folder, not a name).
        cwd, options, marker = victim, [], "marker"
    else:
        cwd, options, marker = elsewhere, ["--ro-bind", str(victim)], f"{victim}/marker"
    outcomes = set()
    for _ in range(12):
        # The swapping starts as the launcher does.
        proc = subprocess.Popen([sys.executable, "-P", "-m", "ns_kernel", "run", *options, "--",
                                 "/bin/sh", "-c", f"cat {marker}; ls /proc | grep -c '^[0-9]'"],
                                cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        thread = threading.Thread(target=swap)
        thread.start()
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            stop.set()
            thread.join()
            stop.clear()
        # Put things back as they were for the next round.
        if os.path.islink(victim):
            libc.renameat2(-100, str(victim).encode(), -100, str(tmp_path / "swap").encode(),
                           RENAME_EXCHANGE)
        if proc.returncode == 0:
            assert out.startswith("the real folder"), (out, err)
            outcomes.add("real folder")
        else:
            assert "moved or became a link while the kernel started" in err or \
                "working directory" in err or "it is / or a link to it" in err, err
            outcomes.add("refused")
    assert outcomes    # every round ended in one of the two


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_a_config_file_the_kernel_could_write_is_never_read(tmp_path, path):
    # Attack: with "." on JUPYTER_CONFIG_PATH (a server started that way), the notebook
    # folder is a config dir: a kernel plants ns_kernel_config.py there, and the next
    # start's launcher, on the host, runs it (it ran before the plan refused the folder).
    folder = tmp_path / "notebooks"
    folder.mkdir()
    os.chmod(folder, 0o777)
    ran = tmp_path / "ran"
    (folder / "ns_kernel_config.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    said = failed_start(path, folder, {"JUPYTER_CONFIG_PATH": "."})
    assert f"working directory {folder}" in said and "lies in" in said, said
    assert not ran.exists()


# -- what else on the host reads what a kernel writes --------------------------------------
# Git dirs a .git file names, repositories in dot dirs or made while a kernel runs, FIFOs
# where Linux has no Landlock, the Jupyter server's own import path; and what the rules
# must not cost a notebook (moving its files between dirs).

FSMONITOR = '[core]\\n\\tfsmonitor = touch {ran}\\n'


def open_up(path):
    """What the sandbox's uid may change, as the user's own kernel could (root's kernels
    run as nobody)."""
    for d, _, files in os.walk(path):
        os.chmod(d, 0o777)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666)


def git(*args, cwd):
    """git on the host, as the user runs it in a terminal or JupyterLab's git extension."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def run_in_kernel(path, folder, code):
    k = start_kernel(str(folder), kernel_name=PATHS[path])
    try:
        out, error, _ = k.execute(ATTEMPT + code)
    finally:
        stop_kernel(k)
    assert error is None, out
    return results(out), out


# -- git repositories the start-time scan does not see ------------------------------------

@pytest.mark.parametrize("path", ["argv", "provisioner"])
def test_a_repository_made_while_the_kernel_runs_is_read_only_once_it_restarts(tmp_path, path):
    # The repository search runs at each start: a project the user clones (or `git
    # init`s, or moves) into the notebook folder while a kernel runs there is writable by
    # that kernel until it restarts (docs/trust.md says so, and to restart it). After the
    # restart the kernel cannot plant core.fsmonitor or a hook for the user's next
    # `git status` on the host.
    folder = shared_folder(tmp_path)
    ran = tmp_path / "ran"
    k = start_kernel(str(folder), kernel_name=PATHS[path])
    try:
        subprocess.run(["git", "init", "-q", str(folder / "proj")], check=True)
        open_up(folder / "proj")
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        out, error, _ = k.execute(ATTEMPT + f"""import os
def write(p, text):
    with open(p, "a") as f:
        f.write(text)
attempt("config", lambda: write("proj/.git/config", "{FSMONITOR.format(ran=ran)}"))
attempt("hook", lambda: write("proj/.git/hooks/post-checkout", "#!/bin/sh\\ntouch {ran}\\n"))
""")
    finally:
        stop_kernel(k)
    assert error is None, out
    seen = results(out)
    git("status", cwd=folder / "proj")
    assert seen["config"] != "ALLOWED" and seen["hook"] != "ALLOWED", out
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_the_git_dir_a_dot_git_file_names_is_read_only(tmp_path, path):
    # Attack: the folder's .git is a file (`git init --separate-git-dir`, the bare repo +
    # worktrees layout, `gitdir: ./repo.git`): the scan binds that one file read-only,
    # not the git dir it names. That dir lies in the folder, writable: the kernel puts
    # core.fsmonitor in its config, and `git status` in the folder on the host runs it.
    folder = shared_folder(tmp_path)
    ran = tmp_path / "ran"
    subprocess.run(["git", "init", "-q", "--separate-git-dir", str(folder / "repo.git"),
                    str(folder)], check=True)
    open_up(folder / "repo.git")
    os.chmod(folder / ".git", 0o666)
    seen, out = attack(path, folder, f"""import os
def write(p, text):
    with open(p, "a") as f:
        f.write(text)
attempt("gitfile", lambda: write(".git", "x"))
attempt("config", lambda: write("repo.git/config", "{FSMONITOR.format(ran=ran)}"))
attempt("hook", lambda: write("repo.git/hooks/post-checkout", "#!/bin/sh\\n"))
attempt("rename", lambda: os.rename("repo.git", "old.git"))
""")
    assert seen["gitfile"] == "OSError", out       # the .git file itself is held
    git("status", cwd=folder)
    for what in ("config", "hook", "rename"):
        assert seen[what] != "ALLOWED", (what, out)
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"


@pytest.mark.parametrize("path", ["argv", "run"])
def test_a_repository_in_a_dot_dir_of_the_folder_is_read_only(tmp_path, path):
    # Attack: the scan skips dot dirs (right for a home, whose dot entries the kernel
    # never sees; not for a notebook folder, where they are shown read-write). A vendored
    # project in .vendor/lib, a tool's checkout in .deps/, a `pip install -e git+...`
    # clone in .venv/src/: the kernel writes its config, git on the host runs it.
    folder = shared_folder(tmp_path, ".vendor/lib")
    ran = tmp_path / "ran"
    subprocess.run(["git", "init", "-q", str(folder / ".vendor" / "lib")], check=True)
    open_up(folder / ".vendor")
    seen, out = attack(path, folder, f"""
def write(p, text):
    with open(p, "a") as f:
        f.write(text)
attempt("config", lambda: write(".vendor/lib/.git/config", "{FSMONITOR.format(ran=ran)}"))
""")
    git("status", cwd=folder / ".vendor" / "lib")
    assert seen["config"] != "ALLOWED", out
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"


# -- Linux without Landlock ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["argv", "run"])
def test_without_landlock_a_kernel_makes_no_fifo_in_the_folder(tmp_path, path):
    # docs/trust.md: a kernel that tries mkfifo in the notebook folder gets "Permission
    # denied" ("a FIFO hangs whoever opens it": the Jupyter server's contents API opening
    # notes.ipynb, a checkpoint, git add). Without Landlock the seccomp filter stands in
    # for it, but denies only symlink/symlinkat: mknod(S_IFIFO) passes.
    folder = shared_folder(tmp_path)
    # A template of its own, started without Landlock (a short path: its socket's).
    runtime = tempfile.mkdtemp(prefix="rt22-")
    code = ATTEMPT + """import os
attempt("mkfifo", lambda: os.mkfifo("notes.ipynb"))
attempt("mknod", lambda: os.mknod("data.csv", 0o10644))
attempt("file", lambda: open("notes.txt", "w").close())
"""
    try:
        done = subprocess.run([sys.executable, "-c", WITHOUT_LANDLOCK, PATHS.get(path, path),
                               str(folder), code], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "XDG_RUNTIME_DIR": runtime})
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    seen = results(done.stdout)
    assert seen["file"] == "ALLOWED", done.stdout
    assert seen["mkfifo"] == seen["mknod"] == "PermissionError", done.stdout
    assert sorted(os.listdir(folder)) == ["notes.txt"]


# -- the Jupyter server's own import path ---------------------------------------------------

# A Jupyter server started as `python -m jupyterlab` (or `python -m jupyter_server`) in
# the notebook folder: Python puts that folder first on the server's sys.path. The
# provisioner runs in the server's process; the server imports nbconvert only when the
# user first exports a notebook (File > Save and Export As, jupyter_server/nbconvert/
# handlers.py: `from nbconvert.exporters.base import get_exporter`).
SERVER = """import os, sys
sys.path.insert(0, os.getcwd())     # what `python -m jupyterlab` run here has first
name, code = sys.argv[1:]
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=name)
try:
    km.start_kernel(cwd=os.getcwd())
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
except Exception as exc:
    print("REFUSED", exc)
    km.shutdown_kernel(now=True)
    sys.exit(0)
try:
    def show(msg):
        if msg["msg_type"] == "stream":
            print(msg["content"]["text"], end="")
    kc.execute_interactive(code, timeout=30, output_hook=show)
finally:
    kc.stop_channels()
    km.shutdown_kernel()
try:
    from nbconvert.exporters.base import get_exporter    # the user exports a notebook
except Exception:
    pass
"""


@pytest.mark.parametrize("path", ["provisioner"])
def test_a_server_whose_import_path_holds_the_folder_starts_no_kernel_there(tmp_path, path):
    # Attack: the kernel writes nbconvert/__init__.py into its folder; the server, whose
    # sys.path starts with that folder, imports it at the user's first export, on the
    # host. The launcher refuses the folder on its own sys.path or PYTHONPATH; the
    # provisioner, in the server's process, never looks at the server's.
    folder = shared_folder(tmp_path)
    ran = tmp_path / "ran"
    code = ATTEMPT + f"""import os
def plant():
    os.makedirs("nbconvert", exist_ok=True)
    with open("nbconvert/__init__.py", "w") as f:
        f.write("open({str(ran)!r}, 'w').close()\\n")
attempt("plant", plant)
"""
    done = subprocess.run([sys.executable, "-c", SERVER, PATHS[path], code], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not ran.exists(), ("the server imported the kernel's nbconvert/__init__.py",
                              done.stdout)


# -- not an attack: what the Landlock ruleset costs a notebook ------------------------------

@pytest.mark.parametrize("path", ["argv", "run"])
def test_a_kernel_moves_its_own_files_between_folders(tmp_path, path):
    # Not a way out, a regression the Landlock ruleset brought: Landlock denies every
    # link or rename into another directory (LANDLOCK_ACCESS_FS_REFER is "denied by
    # default by any ruleset, even if not handled"), so os.rename("a", "sub/a"),
    # Path.rename, os.replace of a temp file made in another dir of the folder or in
    # /tmp's own subdirs, fail with EXDEV, where a plain kernel moves the file.
    folder = shared_folder(tmp_path, "results")
    seen, out = attack(path, folder, """import os
open("run.csv", "w").close()
attempt("folder", lambda: os.rename("run.csv", "results/run.csv"))
os.makedirs("/tmp/work/out")
open("/tmp/work/t", "w").close()
attempt("tmp", lambda: os.replace("/tmp/work/t", "/tmp/work/out/t"))
""")
    assert seen == {"folder": "ALLOWED", "tmp": "ALLOWED"}, out


# -- second look: nested writable folders, .git file contents, the persistent home ---------
# A second red team on the mechanisms the first one brought: pin_ancestors, the repository
# search's reading of .git files, links_in, and what init itself does with the paths of a
# home the kernel wrote in an earlier session.

def second_attack(path, cwd, code, options=(), env=None):
    """attack(), with launcher options on every start path (a kernelspec of the test's
    own for kernels, as test_a_kernel_makes_no_links_where_the_host_reads has)."""
    if path == "run" or not options:
        return attack(path, cwd, code, env=env, options=options)
    name = start_path_spec(f"trust-second-{path}", path, options)
    k = start_kernel(str(cwd), kernel_name=name, env=env)
    try:
        out, error, _ = k.execute(ATTEMPT + code)
    finally:
        stop_kernel(k)
    assert error is None, out
    return results(out), out


@pytest.mark.parametrize("path", [*PATHS, "run"])
def test_second_look_a_folder_deep_in_a_rw_bind_keeps_what_the_host_imports(tmp_path, path):
    # Attack: the notebook folder lies inside a --rw-bind (a shared data dir, a course's
    # folder): /data/u/nb. pin_ancestors pins the dirs between a writable bind and a mount
    # below it, but skips a mount that is itself writable (the folder), so /data/u, which
    # merely holds the folder's mount point, is the kernel's to rename. It renames it and
    # makes a fresh u/nb/src/lib (PYTHONPATH, read-only inside) with a sitecustomize.py: the
    # next launcher (any start path, from that folder) runs it on the host, with the
    # server's rights (root's, for a root-run hub: Python does not check ownership).
    data = shared_folder(tmp_path, "u/nb/src/lib")      # the --rw-bind
    folder, lib, ran = data / "u" / "nb", data / "u" / "nb" / "src" / "lib", tmp_path / "ran"
    seen, out = second_attack(path, folder, f"""import os
attempt("rename-above", lambda: os.rename({str(data / 'u')!r}, {str(data / 'u.old')!r}))
def plant():
    os.makedirs({str(lib)!r})
    with open({str(lib / 'sitecustomize.py')!r}, "w") as f:
        f.write("open({str(ran)!r}, 'w').close()\\n")
attempt("plant", plant)
""", options=("--rw-bind", str(data)), env={"PYTHONPATH": str(lib)})
    # The next start: its interpreter, on the host, imports from PYTHONPATH first.
    subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", "--rw-bind", str(data),
                    "--", "/bin/true"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(lib)},
                   capture_output=True, timeout=60)
    assert not ran.exists(), "the next launcher ran the kernel's sitecustomize.py on the host"
    assert seen["rename-above"] != "ALLOWED", out
    assert not (data / "u.old").exists()


@pytest.mark.parametrize("path", ["argv", "provisioner", "run"])
def test_second_look_a_folder_deep_in_a_shared_home_keeps_its_git(fake_home, path):
    # Attack: --home shared binds each of the home's entries read-write; a notebook in
    # ~/work/course/nb lies two dirs below one. The folder's .git is read-only and a mount
    # point, but ~/work/course is neither (pin_ancestors skips the folder, itself
    # writable): the kernel renames it and puts a fresh course/nb/.git with core.fsmonitor
    # where the user's was; `git status` there on the host (the user's own kernel: same
    # owner, git's safe.directory check passes) runs it.
    home, ran = fake_home, fake_home.parent / "ran"
    folder = home / "work" / "course" / "nb"
    folder.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    open_up(home / "work")
    before = os.stat(folder / ".git").st_ino
    course = home / "work" / "course"
    seen, out = second_attack(path, folder, f"""import os, shutil
attempt("rename-above", lambda: os.rename({str(course)!r}, {str(course) + '.old'!r}))
def plant():
    shutil.copytree({str(course) + '.old/nb/.git'!r}, {str(folder / '.git')!r})
    with open({str(folder / '.git' / 'config')!r}, "a") as f:
        f.write("{FSMONITOR.format(ran=ran)}")
attempt("plant", plant)
""", options=("--home", "shared") if path == "run" else ("--home=shared",),
        env={"HOME": str(home)})
    git("status", cwd=folder)
    assert not ran.exists(), "git status on the host ran the kernel's core.fsmonitor"
    assert os.stat(folder / ".git").st_ino == before, "the folder's .git was replaced"
    assert seen["rename-above"] != "ALLOWED", out


@pytest.mark.parametrize("path", ["argv", "run"])
def test_second_look_a_dot_git_file_cannot_make_the_folder_read_only(tmp_path, path):
    # Attack (denial of service): the repository search follows `gitdir:` in every .git
    # file it finds and binds the dir it names read-only where it lies in a writable
    # folder. A kernel writes `.git` = "gitdir: ." (or names any dir of a shared folder, or
    # a --rw-bind's root): from the next start on, every kernel there, anyone's, finds its
    # notebook folder read-only (notebooks cannot save their outputs, `Read-only file
    # system`), until someone spots the one-line file.
    folder = shared_folder(tmp_path, "results")
    seen, out = attack(path, folder, """
attempt("gitfile", lambda: open(".git", "w").write("gitdir: .\\n"))
attempt("gitfile-sub", lambda: open("results/.git", "w").write("gitdir: .\\n"))
""")
    assert seen == {"gitfile": "ALLOWED", "gitfile-sub": "ALLOWED"}, out    # a file, as any
    seen, out = attack(path, folder, """
attempt("save", lambda: open("notes.txt", "w").write("x"))
attempt("save-sub", lambda: open("results/run.csv", "w").write("x"))
""")
    assert seen == {"save": "ALLOWED", "save-sub": "ALLOWED"}, out


@pytest.mark.parametrize("path", ["cold", "run"])
def test_second_look_the_persistent_home_cannot_steer_the_next_start(fake_home, tmp_path, path):
    # Attack: with the default --home persistent, the kernel's $HOME is its state dir, where
    # it may make links (plan.links_in). A sys.path entry below the real home (pip install
    # --user, ~/.pyenv, a venv in ~: usual) is mounted on top of that home at each start,
    # by init, which makes the mount point by name (os.makedirs in mount.apply_mount)
    # while the host's whole tree is still at /oldroot. The kernel renames ~/lib (it
    # merely holds the mount point ~/lib/a) and makes ~/lib a link to /oldroot/<anywhere>:
    # the next start's init creates dirs there, on the host, with the user's rights, where
    # the kernel cannot see (the hidden home's dot dirs: ~/.ssh/authorized_keys as a dir
    # locks the user out of ssh). Now a mount point is never made through a link: the next
    # start refuses, in one line naming the link (kernels of one kernelspec share their
    # persistent home: one can stop the next, as README says).
    home = fake_home
    lib = home / "lib" / "a"
    lib.mkdir(parents=True)
    # Where the sandbox's uid may write (nobody, as root: a dir it can reach from /).
    # (Not under /tmp: init mounts its scaffold there, which hides the host's /tmp.)
    escape = tempfile.mkdtemp(prefix="rt22-", dir="/var/tmp")
    os.chmod(escape, 0o777)
    try:
        _steer(path, home, lib, escape, shared_folder(tmp_path))
    finally:
        shutil.rmtree(escape, ignore_errors=True)
        shutil.rmtree(f"{escape}-data", ignore_errors=True)


def _steer(path, home, lib, escape, folder):
    # A persistent home of the test's own (kernels of one kernelspec share theirs).
    env = {"HOME": str(home), "PYTHONPATH": str(lib), "XDG_DATA_HOME": f"{escape}-data"}
    code = f"""import os
h = os.environ["HOME"]
attempt("move-aside", lambda: os.rename(h + "/lib", h + "/lib.old"))
attempt("link", lambda: os.symlink("/oldroot{escape}", h + "/lib"))
"""
    # The folder lies beside the home (below it, $HOME takes no links).
    seen, out = attack(path, folder, code, env=env)
    assert seen == {"move-aside": "ALLOWED", "link": "ALLOWED"}, out     # its own home
    try:
        _, out2 = attack(path, folder, """import os
print("LIB", os.path.realpath(os.environ["HOME"] + "/lib"))
""", env=env)
        started = True
    except (AssertionError, RuntimeError) as exc:     # the start failed
        out2, started = str(exc), False
    assert os.listdir(escape) == [], ("init made dirs on the host, outside the sandbox",
                                      out, out2)
    assert started or "a link or file is in the way" in out2, out2


@pytest.mark.parametrize("path", ["run"])
def test_second_look_a_state_dir_in_the_folder_takes_no_links(tmp_path, path):
    # Attack: Sandbox.state_dir (or $XDG_DATA_HOME) inside a folder the kernel may write
    # (a course's shared folder holding the hub's state): links_in grants links beneath
    # the kernel's persistent $HOME, whose source, <state_dir>/<name>/home, lies in the
    # notebook folder. A link made through $HOME appears in the folder on the host, where
    # the Jupyter server follows it (onto a key, into a dot dir).
    # Refused: the kernel's home on the host may not lie where it may write.
    folder = shared_folder(tmp_path)
    done = subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run",
                           f"--Sandbox.state_dir={folder}/state", "--", "/bin/true"],
                          cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"ns-kernel: state dir {folder}/state/" in done.stderr, done.stderr
    assert "which the kernel may write" in done.stderr
    assert os.listdir(folder) == []


# -- root's folder id map (--idmap-folder) ---------------------------------------------------
# Through it, what root's kernel (nobody) makes in a folder root owns is root's on the host.
# A red team of the first version (on by default) ran a command as root through git, and
# wrote another user's and root's own dot files. Each attack must fail.

ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="only root's kernels see a folder "
                               "through an id map")


def run_script(cwd, script, *options, env=None):
    """`ns-kernel run` of a shell script in cwd, as this (root) user."""
    return subprocess.run([sys.executable, "-P", "-m", "ns_kernel", "run", *options, "--",
                           "/bin/sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@ROOT_ONLY
@pytest.mark.privileged
def test_by_default_a_repository_root_s_kernel_makes_is_no_repository_root_s_git_obeys(
        tmp_path):
    """git refuses a repository another user owns. Through the id map, what the kernel
    makes is root's, and root's `git status` below the folder would run the kernel's
    core.fsmonitor as root, on the host: so the map is only there when asked for."""
    folder = tmp_path / "nb"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(folder, 0o755)
    proof = tmp_path / "ran-as-root"
    done = run_script(folder, (
        "mkdir -p sub/.git/objects sub/.git/refs/heads && "
        "echo 'ref: refs/heads/main' > sub/.git/HEAD && "
        f"printf '[core]\\n\\trepositoryformatversion = 0\\n\\tfsmonitor = \"touch {proof}; false\"\\n'"
        " > sub/.git/config"))
    assert "Permission denied" in done.stderr, done.stderr     # root's folder, nobody's kernel
    assert not (folder / "sub").exists()
    subprocess.run(["git", "status"], cwd=folder, capture_output=True, timeout=60,
                   env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")})
    assert not proof.exists(), "root's git ran the kernel's core.fsmonitor"


@ROOT_ONLY
@pytest.mark.privileged
@pytest.mark.parametrize("options", [[], ["--idmap-folder"]], ids=["default", "idmap"])
def test_root_s_kernel_in_another_user_s_home_cannot_write_their_settings(options):
    """The owner's own kernel never writes the dot entries of its home; root's kernel
    started there, through the id map, wrote them as that user (.bashrc, .ssh)."""
    import pwd
    home = pwd.getpwnam("ns-kernel-test").pw_dir
    probe = os.path.join(home, ".ns-kernel-attack")
    try:
        done = run_script(home, f"touch {probe}", *options)
        assert not os.path.exists(probe), \
            f"root's kernel wrote {probe} as uid {os.stat(probe).st_uid}: {done.stderr}"
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


@ROOT_ONLY
@pytest.mark.privileged
@pytest.mark.parametrize("options", [[], ["--idmap-folder"]], ids=["default", "idmap"])
def test_root_s_kernel_in_root_s_home_cannot_write_it_whatever_home_says(tmp_path, options):
    """$HOME is not always root's home (sudo -E, a service's Environment=): the folder
    /root was then mapped, and the kernel wrote /root/.bashrc and /root/.ssh as root."""
    import pwd
    root_home = pwd.getpwuid(0).pw_dir
    probe = os.path.join(root_home, ".ns-kernel-attack")
    fake = tmp_path / "home"
    fake.mkdir()
    try:
        done = run_script(root_home, f"touch {probe}", *options, env={"HOME": str(fake)})
        assert not os.path.exists(probe), \
            f"root's kernel wrote {probe} as uid {os.stat(probe).st_uid}: {done.stderr}"
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
