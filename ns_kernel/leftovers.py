"""What a kernel leaves where nothing is kept: its private /tmp, /var/tmp, /dev/shm and a
private ($HOME tmpfs) home vanish with its sandbox. Init looks there once the kernel has
ended and the launcher says what is lost, in the server log and, after a restart, in the
new kernel's first output (as it does for a death reason), so that nothing a user wrote
disappears without a word.

Init reads names only, in the sandbox's own view, bounded: a kernel may have left a
million files or names made to confuse a log.
"""
import os

SHOWN = 5            # names quoted in the line
COUNTED = 1000       # entries looked at per directory
# Made by the kernel's own machinery, not by the user: ipykernel's debugger cell files.
NOISE = ("ipykernel_",)


def scan(dirs, mounted=()):
    """Top-level entries of each dir (a path each, dot entries of the home left out:
    tools' caches and settings, and what holds the plan's own mounts, `mounted`, such as
    a notebook folder under /tmp); and how many more there were than are returned."""
    found, more = [], 0
    for path, skip_dot in dirs:
        try:
            entries = os.scandir(path)
        except OSError:
            continue
        with entries:
            for i, entry in enumerate(entries):
                if i >= COUNTED:
                    more += 1
                    break
                name = entry.name
                if (name.startswith(NOISE) or (skip_dot and name.startswith("."))
                        or any(m == entry.path or m.startswith(entry.path + "/") for m in mounted)):
                    continue
                if len(found) < SHOWN:
                    kind = "/" if entry.is_dir(follow_symlinks=False) else ""
                    found.append(f"{path}/{_printable(name)}{kind}")
                else:
                    more += 1
    return found, more


def _printable(name):
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= 60 else name[:57] + "..."


def describe(found, more, who, home_kept=True):
    """The line for the server log; None if nothing was lost. home_kept: $HOME outlives
    the kernel (--home persistent), and is a place to keep files; else (--home private,
    a grader's choice) only the folder is."""
    if not found:
        return None
    extra = f" and {more}{'+' if more >= COUNTED else ''} more" if more else ""
    keep = ("in the notebook's folder or in $HOME" if home_kept else
            "in the notebook's folder ($HOME goes with the kernel too: --home private)")
    return f"ns-kernel: {who} left {', '.join(found)}{extra}, gone with its sandbox: keep files {keep}"
