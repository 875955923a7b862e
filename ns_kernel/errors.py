"""One error type for everything that can go wrong while building a sandbox.

A SetupError names the operation and the path, then the OS's reason, the way
bubblewrap's die_with_error() does; a hint says how to fix the known causes.
It crosses the fork boundary as a small JSON record on the error pipe.
"""
import os
import sys


class SetupError(Exception):
    """A sandbox or launcher step failed; str() is the one line the user reads."""

    def __init__(self, step, syscall="", path="", err=0, hint=""):
        self.step = step
        self.syscall = syscall
        self.path = path
        self.errno = err
        self.hint = hint
        super().__init__(self.line())

    def line(self):
        what = self.syscall or self.step
        if self.path and self.path not in what:
            what = f"{what} {self.path}"
        text = f"ns-kernel: {what}"
        if self.errno:
            text += f": {os.strerror(self.errno)}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    @classmethod
    def from_exception(cls, exc, step, what):
        """Any failure of a child's steps, as one: an OSError names the call that failed
        (the wrappers in syscalls.py say which), anything else is `what` and its repr."""
        if isinstance(exc, cls):
            return exc
        if isinstance(exc, OSError):
            return cls(step, getattr(exc, "call", what), exc.filename or "", exc.errno)
        return cls(step, f"{what}: {exc!r}")

    def to_json(self):
        import json     # here: the warm client imports this module, and json imports re
        return json.dumps({"step": self.step, "syscall": self.syscall, "path": self.path,
                           "errno": self.errno, "hint": self.hint})

    @classmethod
    def from_json(cls, data):
        """The first record: the step that failed first; who noticed it after (e.g. init,
        when the prestarted interpreter it waited for gave up) may add another."""
        import json
        record, _ = json.JSONDecoder().raw_decode(data.decode() if isinstance(data, bytes) else data)
        return cls(record["step"], record["syscall"], record["path"], record["errno"], record["hint"])


def moved(source):
    """A path the sandbox would show, changed while a kernel started."""
    return SetupError("mount", f"{source} moved or became a link while the kernel started",
                      hint=("a folder the kernel would see was changed meanwhile, perhaps by "
                            "another kernel that may write its parent; start it again"))


def one_line(func, *args, explain=None):
    """func(*args); a failure as one line on stderr and exit code 1 (2: not ours).
    explain(SetupError) -> SetupError: a better hint where one is known (trial.explain)."""
    try:
        return func(*args)
    except SetupError as exc:
        print((explain(exc) if explain else exc).line(), file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - traitlets' TraitError and friends: one line
        print(f"ns-kernel: {exc}", file=sys.stderr, flush=True)
        return 2
