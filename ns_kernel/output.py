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


class Relay:
    def __init__(self, fd, who):
        self.fd = fd           # read end of the kernel's stdout/stderr pipe
        self.who = who
        self.pending = b""
        self.budget = BURST
        self.refilled = time.monotonic()
        self.dropped = 0       # bytes over the budget since the last line about it

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
        now = time.monotonic()
        self.budget = min(BURST, self.budget + (now - self.refilled) * RATE)
        self.refilled = now
        if len(raw) + 1 > self.budget:
            self.dropped += len(raw) + 1
            return
        self.budget -= len(raw) + 1
        if self.dropped:
            self._say_dropped()
        text = raw[:MAX_LINE].decode("utf-8", "replace")
        text = "".join(c if c.isprintable() or c == "\t" else "?" for c in text)
        try:
            print(f"[{self.who}] {text}", file=sys.stderr, flush=True)
        except OSError:
            pass

    def _say_dropped(self):
        try:
            print(f"ns-kernel: {self.who}: {self.dropped} bytes of its output left out of "
                  f"this log (over {BURST >> 20} MiB at once, then {RATE >> 10} KiB/s)",
                  file=sys.stderr, flush=True)
        except OSError:
            pass
        self.dropped = 0

    def drain(self):
        """What is left once the sandbox has gone."""
        os.set_blocking(self.fd, False)
        while self.handle():
            pass
        self.flush()
        if self.dropped:
            self._say_dropped()
        os.close(self.fd)
