"""An interpreter that imported ipykernel before its sandbox existed, and how it runs the
kernel once inside: shared by the warm template (warm.py) and the prestarted interpreter
of a cold start (prestart.py).

Such an interpreter is exec'd with only the variables that shape Python's startup
(startup_env) and never with the notebook's directory on sys.path (BOOT), so that nothing
it loads comes from a place the kernel could have written. Once inside, run_preloaded
runs `python -m ipykernel_launcher ...` in-process, as a fresh interpreter there would;
when it cannot be faithful (another interpreter, other startup variables, no ipykernel),
it execs instead.
"""
import os
import sys

STARTUP_ENV = ("HOME", "LANG", "LANGUAGE", "TZ")
STARTUP_PREFIXES = ("LC_", "PYTHON")
# What a kernel imports on its way to its first reply, imported once beforehand.
# (Found by comparing sys.modules before and after IPKernelApp.initialize.)
KERNEL_MODULES = ("ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell",
                  "ipykernel.comm", "ipykernel.debugger", "IPython.core.completer",
                  "IPython.core.completerlib", "IPython.core.debugger", "IPython.core.history",
                  "IPython.core.oinspect", "IPython.extensions.storemagic",
                  "jupyter_client.session", "tornado.gen", "tornado.locks", "tornado.queues",
                  "tornado.platform.asyncio", "sqlite3", "pdb", "pydoc", "faulthandler",
                  "gzip", "mimetypes", "http.client", "xmlrpc.client", "unicodedata",
                  "encodings.idna", "runpy", "pickle", "json")
# Read at import, set in every kernel's environment (plan.kernel_env), checked by
# run_preloaded. JPY_PARENT_PID (ipykernel's IPKernelApp.parent_handle): 1 says there is
# no parent to poll (it would see init, and quit); the launcher watches the server itself.
# PYDEVD_DISABLE_FILE_VALIDATION: debugpy, which ipykernel imports, would print eight
# lines to the server log at every start that frozen modules may hide breakpoints (in io,
# abc, posixpath, stat): ipykernel sets it too when frozen modules are kept.
IMPORT_ENV = {"JPY_PARENT_PID": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
PRELOADED = False    # set once KERNEL_MODULES are imported
TITLE_ROOM = 1024    # bytes of command line kept for the kernel's argv (boot_argv)
IMPORTS_SET_ENV = {}  # what those imports put in os.environ (debugpy does): a fresh start would too


def startup_env(environ):
    return {k: v for k, v in environ.items()
            if k in STARTUP_ENV or k.startswith(STARTUP_PREFIXES)}


def boot_argv(call):
    """`python -c` running `call` (e.g. "ns_kernel.template:template_main"). The current
    directory (the notebook's, which a kernel may write) must not be on sys.path for the
    imports this interpreter makes outside any sandbox: `-m` would put it first, `-c` puts
    '' there, and an empty PYTHONPATH entry adds it too; all go before the first import
    (site's own imports come before any of them). The launcher refuses a plan whose
    sys.path has the folder itself (plan.py), so a kernel never runs from such a start."""
    module, func = call.split(":")
    # The trailing spaces are room: a kernel this interpreter becomes shows its own argv
    # in this one's place (titles.kernel), cut to what the exec'd command line holds.
    return [sys.executable, "-c",
            "import os, sys; here = os.path.realpath('.'); sys.path[:] = [p for p in sys.path "
            f"if p and os.path.realpath(p) != here]; from {module} import {func}; {func}()"
            + " " * TITLE_ROOM]


def spawn(call, args=(), keep=None, stdio=None):
    """Start such an interpreter (boot_argv) with only the startup variables, in its own
    session; return its pid. keep: the one fd it inherits besides 0, 1 and 2; stdio: an
    fd for its 0, 1 and 2 (default: ours). fork and exec, not posix_spawn: glibc's leaves
    its internal signals (32, 33) ignored, and every kernel, and its subprocesses, would
    inherit that."""
    argv = [*boot_argv(call), *map(str, args)]
    env = {**startup_env(os.environ), **IMPORT_ENV}
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if stdio is not None:
                for fd in (0, 1, 2):
                    os.dup2(stdio, fd)
            # Nothing else of ours: an inheritable fd of our caller's (a shell's 3>, a
            # jobserver pipe) would live on in a template, and in each sandbox's init.
            keep = 2 if keep is None else keep
            os.closerange(3, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            os.set_inheritable(keep, True)
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    return pid


def import_kernel_modules(extra=()):
    """Import what the kernel needs; None, or why not (then the kernel execs, and says
    what is missing in its own words)."""
    global PRELOADED
    import importlib
    before = dict(os.environ)
    try:
        for name in (*KERNEL_MODULES, *extra):
            importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not run in-process
        return f"{type(exc).__name__}: {exc}"
    IMPORTS_SET_ENV.update((k, v) for k, v in os.environ.items() if before.get(k) != v)
    PRELOADED = True
    return None


def threads():
    return len(os.listdir("/proc/self/task"))


def run_preloaded(plan, ctl, err_w):
    """The kernel's last step (in place of forked.exec_kernel): run `python -m MODULE`
    in this already-initialized interpreter, with the plan's environment and argv."""
    import signal
    from . import forked, titles
    argv = list(plan.argv)
    env = dict(plan.env)
    if (argv[:2] != [sys.executable, "-m"] or len(argv) < 3
            or not PRELOADED
            or startup_env(_without_packages(env, plan.package_paths)) != startup_env(os.environ)
            or any(env.get(k) != v for k, v in IMPORT_ENV.items())
            or not _could_have_started(argv[0])
            or _user_site_gone()
            or _shadowed(plan.package_paths)):
        # Not what this interpreter was started as (a denied startup variable, another
        # Python, a private $HOME hiding the user site-packages it loaded from, a package
        # the user installed over one it imported), or one the sandbox's uid could not
        # have started: a fresh exec is the only faithful start (or failure, with its
        # reason).
        return forked.exec_kernel(plan, ctl, err_w)
    forked.enter_kernel_session(plan, ctl, err_w)
    from .syscalls import set_dumpable
    # Root's sandbox switched uid, which made it undumpable: the kernel could not read its
    # own /proc/self; an execve would have reset this.
    set_dumpable()
    # What a fresh interpreter starts with: its KeyboardInterrupt handler, unless SIGINT
    # is ignored, as a kernel's is until ipykernel's start (forked.enter_kernel_session;
    # replacing it here let a restart's interrupt in that window make the kernel exit 1).
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(IMPORTS_SET_ENV)
    # Where PYTHONPATH would have put them, after the script's (here: the cwd's) entry.
    sys.path[0:0] = [os.getcwd(), *plan.package_paths]
    _forget_host_facts()
    titles.kernel(argv)
    os.close(err_w)      # the sandbox is complete: the launcher sees EOF, as after execve
    _run_module_as_main(argv[2], argv[3:])


def _could_have_started(interpreter):
    """What an exec inside would need: the interpreter and ipykernel's code readable by
    this uid. And one thing only an exec gives: /proc/self/exe on the read-only bind. This
    interpreter was exec'd on the host's own mount, so if this uid may write the file
    there, /proc/self/exe would be a way to it around the read-only view (a venv or conda
    env owned by the kernel's user): exec instead."""
    import ipykernel
    # access(2), not stat: an owner unmapped here shows as 65534, which may be our uid too.
    return (os.access(interpreter, os.X_OK)
            and os.access(os.path.dirname(ipykernel.__file__), os.R_OK | os.X_OK)
            and not os.access("/proc/self/exe", os.W_OK))


def _without_packages(env, package_paths):
    """env as this interpreter was started with it: the plan puts the packages the user
    installed first on PYTHONPATH (plan.with_packages), which run_preloaded adds itself."""
    if not package_paths:
        return env
    rest = env["PYTHONPATH"].split(os.pathsep)[len(package_paths):]
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    if rest:
        env["PYTHONPATH"] = os.pathsep.join(rest)
    return env


def _shadowed(package_paths):
    """A package the user installed has the name of one this interpreter imported: a
    fresh interpreter would import the user's."""
    names = set()
    for path in package_paths:
        try:
            entries = os.listdir(path)
        except OSError:
            continue
        names.update(e.split(".", 1)[0].split("-", 1)[0] for e in entries)
    return bool(names & {name.split(".", 1)[0] for name in sys.modules})


def _user_site_gone():
    """~/.local/.../site-packages was on sys.path outside (not in a venv) but is not here."""
    import site
    return (bool(site.ENABLE_USER_SITE) and site.USER_SITE in sys.path
            and not os.path.isdir(site.USER_SITE))


def _forget_host_facts():
    """Module caches filled before this sandbox existed, on the host."""
    import platform
    import time
    platform._uname_cache = None
    time.tzset()
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None


def _run_module_as_main(module, args):
    import atexit
    import runpy
    import threading
    import traceback
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, status 1
        traceback.print_exc()
        code = 1
    # The interpreter's own exit: join threads, run atexit (ipykernel closes its sockets).
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
