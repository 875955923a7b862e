"""ns_kernel: Isolated Python, an ipykernel in its own user, PID, mount, IPC, UTS and net
namespaces, with no daemon, no setuid helper and no external sandbox binary."""
__version__ = "0.1.0"
