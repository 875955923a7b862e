"""What a kernel's start made on the host, as plain data, and the one way to remove it.

The launcher fills a Made in as it makes each thing (the socket dir, the links where an
ipc client looks for the sockets, the kernel's cgroup). The same record goes, as JSON, to
whoever may have to remove it: the warm monitor the launcher hands the kernel to
(handoff.py), and the requester (warm.Launcher), which removes it if that monitor is
SIGKILLed before it could. remove() serves the three.
"""
import json
from dataclasses import asdict, dataclass, field

from . import cgroup, socketdir


@dataclass
class Made:
    socket_dir: str = ""
    links: list = field(default_factory=list)
    cgroups: dict = field(default_factory=dict)     # controller -> dir (cgroup.Cgroup.dirs)
    cgroup_version: int = 0

    def dumps(self):
        return json.dumps(asdict(self)).encode()

    @classmethod
    def loads(cls, data):
        """The Made in data (dumps); a ValueError if it is not one."""
        fields = json.loads(data)
        if not isinstance(fields, dict) or set(fields) != set(cls.__dataclass_fields__):
            raise ValueError(f"not a record of what a launch made: {data[:80]!r}")
        return cls(**fields)

    def cgroup(self):
        """The kernel's cgroup, to read its usage or remove it; None without one."""
        return cgroup.Cgroup(self.cgroup_version, self.cgroups) if self.cgroups else None

    def remove_links(self):
        """The links first, apart: a restart makes them again at once (unless the next
        kernel's launcher has made them its own: socketdir.unlink_ipc_paths)."""
        socketdir.unlink_ipc_paths(self.links, self.socket_dir)
        self.links = []


def remove(made, cgroup_beside=False):
    """Remove what made holds: links, socket dir (by handles, whatever the kernel left in
    it), cgroup. cgroup_beside: in a thread beside the caller (a Jupyter server's event
    loop): a cgroup whose kernel held GBs takes seconds to empty. Not a daemon thread: a
    client that exits waits for it."""
    made.remove_links()
    if made.socket_dir:
        socketdir.remove(made.socket_dir)
        made.socket_dir = ""
    group, made.cgroups = made.cgroup(), {}
    if group and cgroup_beside:
        import threading
        threading.Thread(target=group.remove, name="ns-kernel-remove-cgroup").start()
    elif group:
        group.remove()
