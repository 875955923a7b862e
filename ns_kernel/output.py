"""The kernel's own stdout and stderr, into the server's log.

A kernel never gets the server's file descriptors: on a terminal it could read what the
user types there and rewrite the screen; on a log file it could read the server's token
and truncate it. It gets /dev/null and a pipe; the launcher copies what comes through,
one line at a time, marked as the kernel's ([kernel 3f2a9c1e]) so that it cannot pass for
the launcher's own lines, with control characters (terminal escapes) removed. The log is
the host's disk and the launcher's CPU (outside the kernel's cgroup): a kernel gets a
budget of bytes, refilled at a steady rate, and what goes over it is dropped and counted.
"""
import os
import sys
import time

MAX_LINE = 8192
BURST = 1 << 20       # bytes a kernel may write to the log at once
RATE = 4 << 10        # bytes per second after that (~350 MB a day at most)


class Budget:
    """A token bucket: `burst` at once, then `rate` a second; what goes over it is
    counted in `over` until the caller has said so."""

    def __init__(self, burst, rate):
        self.burst, self.rate = burst, rate
        self.left, self.at = burst, time.monotonic()
        self.over = 0

    def take(self, amount):
        now = time.monotonic()
        self.left = min(self.burst, self.left + (now - self.at) * self.rate)
        self.at = now
        if amount > self.left:
            self.over += amount
            return False
        self.left -= amount
        return True


class Relay:
    def __init__(self, fd, who):
        self.fd = fd           # read end of the kernel's stdout/stderr pipe
        self.who = who
        self.pending = b""
        self.budget = Budget(BURST, RATE)

    def handle(self):
        """Copy what the pipe holds; False once the kernel side has closed it, None if
        it holds nothing now."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        if not data:
            self.flush()
            return False
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_LINE:
            lines.append(self.pending)
            self.pending = b""
        for line in lines:
            self._write(line)
        return True

    def flush(self):
        if self.pending:
            self._write(self.pending)
            self.pending = b""

    def _write(self, raw):
        if not self.budget.take(len(raw) + 1):
            return
        if self.budget.over:
            self._say_dropped()
        text = raw[:MAX_LINE].decode("utf-8", "replace")
        text = "".join(c if c.isprintable() or c == "\t" else "?" for c in text)
        log(f"[{self.who}] {text}")

    def _say_dropped(self):
        log(f"ns-kernel: {self.who}: {self.budget.over} bytes of its output left out of "
            f"this log (over {BURST >> 20} MiB at once, then {RATE >> 10} KiB/s)")
        self.budget.over = 0

    def drain(self):
        """What is left once the sandbox has gone."""
        os.set_blocking(self.fd, False)
        while self.handle():
            pass
        self.flush()
        if self.budget.over:
            self._say_dropped()
        os.close(self.fd)


def log(line):
    """One line to the server's log, in one write: the proxy's threads log too (proxy.py)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except OSError:
        pass
