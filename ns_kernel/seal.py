"""The last steps before the kernel (or `ns-kernel run`'s command) runs: once, in order,
for every way in. Init's forked child takes them before it execs the kernel (a cold start,
`--no-prestart`, `ns-kernel run`) or runs the warm template's preloaded one; the
prestarted interpreter's helper takes them before it forks the kernel. What hardens a
kernel goes here, so that no way in can miss it.
"""
import errno

from . import limits, seccomp
from .errors import SetupError
from .net import MODES
from .syscalls import LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LandlockFs, drop_all_capabilities, \
    join_new_session_keyring, landlock_abi, landlock_restrict, set_dumpable, set_no_new_privs

# What a kernel may make only where nothing on the host reads it (plan.links_in): the
# Jupyter server, git and editors follow a link in the notebook folder out of it (onto a
# key, into a dot dir the next host program runs from), and a FIFO there hangs whoever
# opens it; device nodes (the whiteouts rename(2) can make) are no notebook's either.
# Landlock's "make" rights also cover renaming and linking one into a dir.
LINKS = (LandlockFs.LANDLOCK_ACCESS_FS_MAKE_SYM | LandlockFs.LANDLOCK_ACCESS_FS_MAKE_FIFO
         | LandlockFs.LANDLOCK_ACCESS_FS_MAKE_CHAR | LandlockFs.LANDLOCK_ACCESS_FS_MAKE_BLOCK)
# Moving a file to another dir: any Landlock ruleset denies it unless a rule grants it
# (ABI 2), even where it is not handled; granted everywhere, a move is then held to the
# "make" rights of where it goes (a link moved out of /tmp into the folder: denied).
REFER = LandlockFs.LANDLOCK_ACCESS_FS_REFER

# The host's OOM killer takes a kernel before the Jupyter server (0) and the rest of the
# host: a runaway cell costs its own kernel, not everyone's.
OOM_SCORE_ADJ = 500


def seal(plan):
    # Per user namespace, now that this one exists: RLIMIT_NPROC counts the sandbox's
    # processes, not every process of the uid on the host.
    limits.apply_rlimits(plan.limits)
    limits.cap_shared_budgets()
    # Its /proc/self is its own (a change of uid, or init's choice, left it undumpable:
    # owned by the host's root, so not even oom_score_adj could be written).
    set_dumpable(True)
    # The keyring the Jupyter server had (its keys, root's for a hub) is not the kernel's.
    _step("keyctl(KEYCTL_JOIN_SESSION_KEYRING)", _join_new_session_keyring)
    _step("write /proc/self/oom_score_adj", _raise_oom_score)
    # setuid binaries stay inert, and the filter below may be loaded without privileges.
    _step("prctl(PR_SET_NO_NEW_PRIVS)", set_no_new_privs)
    _step("landlock_restrict_self", lambda: _landlock(plan))
    _step("capset (drop every capability)", drop_all_capabilities)
    # Last: what the steps above call (keyctl, prctl) is denied by it.
    if plan.seccomp:
        _step("load the seccomp filter", lambda: seccomp.load(plan.seccomp))


def _landlock(plan):
    # The host's abstract unix sockets (X11's, D-Bus's) are in its network namespace,
    # which `--network host` shares: none of them may be reached from here. Older Linux
    # (Landlock ABI < 6) cannot scope them; the README says so.
    scoped = (LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
              if MODES[plan.network].scope_abstract_unix and landlock_abi() >= 6 else 0)
    # links_in is None where Linux has no Landlock (ABI 2): the seccomp filter denies
    # symlink(2) and mknod(2) instead.
    if plan.links_in is not None:
        landlock_restrict(LINKS | REFER, [("/", REFER), *((d, LINKS) for d in plan.links_in)],
                          scoped)
    elif scoped:
        landlock_restrict(scoped=scoped)


def _join_new_session_keyring():
    try:
        join_new_session_keyring()
    except OSError as exc:
        # EPERM is none of keyctl's own errors: a seccomp filter denies it (Docker's
        # default profile does, for the whole container). The kernel inherits that filter
        # and can reach no keyring at all: there is nothing to leave.
        if exc.errno != errno.EPERM:
            raise


def _raise_oom_score():
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(OOM_SCORE_ADJ))


def _step(what, action):
    try:
        action()
    except OSError as exc:
        hint = ""
        if isinstance(exc, seccomp.SeccompError) and exc.strerror and "libseccomp" in exc.strerror:
            hint = f"{exc.strerror}, or run without the filter: --seccomp off"
        raise SetupError("seal", what, "", exc.errno, hint) from None
