"""The mount namespace: build a new root from the plan's mounts and switch to it.

As bubblewrap does: a tmpfs becomes the root, the host's root is reachable at /oldroot
while the plan's mounts are made under /newroot, then /newroot becomes / and the old root
is detached, so nothing of the host is left underneath to be revealed by an umount.
"""
import os
import stat
import sys

from . import container, user
from .errors import SetupError, moved
from .plan import Op
from .syscalls import MNT_DETACH, MountAttr, MountFlags, chdir, flag_names, mount, \
    mount_setattr, move_mount, open_tree_clone, pivot_root, umount2

BASE = "/tmp"          # any existing dir works: the tmpfs mounted here moves to / at once
NEWROOT = "/newroot"
OLDROOT = "/oldroot"
NOSUID_NODEV = MountFlags.MS_NOSUID | MountFlags.MS_NODEV
NOEXEC = NOSUID_NODEV | MountFlags.MS_NOEXEC
RO_TOP = MountAttr.MOUNT_ATTR_RDONLY | MountAttr.MOUNT_ATTR_NOSUID | MountAttr.MOUNT_ATTR_NODEV
# The fresh filesystems, with their mount flags. devpts alone keeps device nodes: its pty
# slaves are the nodes, and nodev made every openpty() fail (`!cmd`, %pip, pexpect).
FILESYSTEMS = {
    Op.TMPFS: ("tmpfs", NOSUID_NODEV),
    Op.HIDE: ("tmpfs", NOEXEC),
    Op.PROC: ("proc", NOEXEC),
    Op.SYSFS: ("sysfs", NOEXEC),
    Op.DEVPTS: ("devpts", MountFlags.MS_NOSUID | MountFlags.MS_NOEXEC),
}


def _mount(source, target, fstype, flags, data=None, what=None, shown=None):
    """shown: the path to name in an error, if target is not it (a /proc/self/fd link)."""
    try:
        mount(source, target, fstype, flags, data)
    except OSError as exc:
        target = shown or target
        desc = what or f"mount({fstype or source}, {target}, {flag_names(MountFlags(flags))})"
        # Refused only where parts of /proc or /sys are mounted over: a container's masks.
        hint = container.masks_refuse([fstype]) if fstype in ("proc", "sysfs") else ""
        raise SetupError("mount", desc, target, exc.errno, hint) from None


def _setattr(path, attrs, recursive=True, fd=None):
    try:
        mount_setattr(path, attrs, recursive, fd)
    except OSError as exc:
        raise SetupError("mount", f"mount_setattr({path}, {flag_names(attrs)})", path,
                         exc.errno) from None


def makedirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SetupError("mount", "mkdir", path, exc.errno) from None


def mount_point(dest, is_dir, create=True):
    """An O_PATH fd of dest under NEWROOT, a dir (is_dir) or a file, made where missing
    (unless not create: then None if missing), never through a link: the binds of
    folders a kernel may write (its persistent home, the notebook folder) hold what it left
    there, and a link in the way (to /oldroot/...) would make the mount point, and put
    the mount, on the host."""
    names = [name for name in dest.split("/") if name]
    fd = os.open(NEWROOT, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(names):
            last = i == len(names) - 1
            try:
                if create and (is_dir or not last):
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                elif create:
                    try:
                        # Not opened for writing if it exists: a file of a bind already.
                        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd))
                    except FileExistsError:
                        pass
                found = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
                                | (os.O_DIRECTORY if is_dir or not last else 0), dir_fd=fd)
            except OSError as exc:
                if not create:      # missing, a link, a dir it may not enter: not there
                    os.close(fd)
                    return None
                # ENOTDIR/ELOOP: a link (or a file) where a dir of the path must be.
                raise SetupError("mount", "mount point", "/" + "/".join(names[:i + 1]),
                                 exc.errno, "a link or file is in the way, perhaps left by a "
                                 "kernel in its home or folder; remove it") from None
            os.close(fd)
            fd = found
            if last and stat.S_ISLNK(os.fstat(fd).st_mode):
                raise SetupError("mount", "mount point", dest, hint=(
                    "a link is in the way, perhaps left by a kernel in its home or folder; "
                    "remove it"))
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_sources(mounts, cwd, trusted=()):
    """O_PATH handles on every bind source, in the order of the mounts, each resolved once,
    here, by the launcher: what init mounts later is what was checked, whatever a kernel
    renames or links meanwhile in a folder it may write (another kernel's notebook folder,
    a venv there). `cwd` is the launcher's own working directory, taken as it is (no name
    is looked up); the plan's other sources are real paths, so a handle that resolved
    elsewhere means a link appeared on the way (the admin's binds too: Host.probe resolved
    them). `trusted`: the dirs the launcher made for this kernel, not compared. A bind
    with an id map (plan.folder_idmap) comes as its detached mount instead, already seen
    through the map: only host root may make one, and the sandbox is not host root."""
    handles, namespaces = [], {}
    try:
        for m in mounts:
            if m.op not in (Op.BIND, Op.DEVICE):
                continue
            source = "." if m.source == cwd else m.source
            try:
                handles.append(os.open(source, os.O_PATH | os.O_CLOEXEC))
            except OSError as exc:
                raise SetupError("mount", "bind", m.source, exc.errno) from None
            if m.source not in trusted and os.readlink(f"/proc/self/fd/{handles[-1]}") != m.source:
                raise moved(m.source)
            if m.idmap:
                if m.idmap not in namespaces:
                    try:
                        namespaces[m.idmap] = user.idmap_namespace(*zip(*m.idmap))
                    except SetupError:
                        # No user namespace, or no map of the kernel's uid, here: the
                        # sandbox's own start fails the same way next, and says so.
                        namespaces[m.idmap] = None
                if namespaces[m.idmap] is not None:
                    handles[-1] = _idmapped(handles[-1], m, namespaces[m.idmap])
    except BaseException:
        close_all(handles)
        raise
    finally:
        close_all(fd for fd in namespaces.values() if fd is not None)
    return tuple(handles)


def idmapped_tree(handle, source, userns):
    """A detached mount of `handle` (for the path `source`) seen through the id map of
    userns; OSError where Linux cannot make one (the doctor asks this too)."""
    tree = open_tree_clone(handle, source)
    try:
        # The folder's own mount alone: one mounted below it on the host (whatever it is)
        # keeps its owners' ids, as without the map.
        mount_setattr(source, MountAttr.MOUNT_ATTR_IDMAP, False, tree, userns)
    except OSError:
        os.close(tree)
        raise
    return tree


def _idmapped(handle, m, userns):
    """The detached mount of `handle` (then closed) seen through the id map of userns;
    `handle` itself where Linux cannot make one (a filesystem without idmapped mounts:
    NFS): the folder shown as it is, which the kernel cannot write, as the server log
    says."""
    try:
        tree = idmapped_tree(handle, m.source, userns)
    except OSError as exc:
        (host, kernel), _ = m.idmap
        print(f"ns-kernel: warning: {m.source}: its files are uid {host}'s, and this "
              f"filesystem cannot show them as the kernel's (uid {kernel}) to it, as an "
              f"idmapped mount would ({exc.strerror}): the kernel cannot write there; give "
              "the folder to that uid (chown) to let it", file=sys.stderr, flush=True)
        return handle
    os.close(handle)
    return tree


def close_all(handles):
    for fd in handles:
        os.close(fd)


def grab_bind_sources(mounts, handles):
    """Clone every bind source into a detached mount (an fd), while this process still has
    the host's identity: once it becomes the sandbox's uid, host root's 0700 dirs (the
    socket dir's parent, /root) are out of its reach. A mount can only be cloned from this
    mount namespace, not from the launcher's handle (open_sources): the source is looked
    up again here and must be the very file the handle holds."""
    # Private: nothing we mount leaks to the host, and nothing the host mounts later
    # (a USB stick, another kernel's socket dir) appears inside.
    _mount(None, "/", None, MountFlags.MS_REC | MountFlags.MS_PRIVATE, what="make / private")
    trees = {}
    binds = [i for i, m in enumerate(mounts) if m.op in (Op.BIND, Op.DEVICE)]
    for i, handle in zip(binds, handles, strict=True):
        source = mounts[i].source
        try:
            here = os.open(source, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise SetupError("mount", "open", source, exc.errno) from None
        try:
            held, found = os.fstat(handle), os.fstat(here)
            if (held.st_dev, held.st_ino) != (found.st_dev, found.st_ino):
                raise moved(source)
            # An id-mapped bind's handle is its mount already (open_sources), which shows
            # the folder as the kernel's own; else Linux could not make one.
            mapped = mounts[i].idmap and held.st_uid == mounts[i].idmap[0][1]
            tree = os.dup(handle) if mapped else open_tree_clone(here, source)
            trees[i] = (tree, stat.S_ISDIR(found.st_mode))
        except OSError as exc:
            raise SetupError("mount", "bind", source, exc.errno) from None
        finally:
            os.close(here)
    return trees


def enter_new_root(mounts, trees, cwd):
    """Make the plan's mounts and pivot into them. Runs as PID 1 of the new PID namespace,
    so the fresh /proc shows only the sandbox."""
    _mount("tmpfs", BASE, "tmpfs", NOSUID_NODEV, "mode=0755,size=64k")
    chdir(BASE)
    makedirs(BASE + NEWROOT)
    makedirs(BASE + OLDROOT)
    try:
        pivot_root(BASE, BASE + OLDROOT)
    except OSError as exc:
        raise SetupError("mount", "pivot_root", BASE, exc.errno) from None
    chdir("/")
    _mount("tmpfs", NEWROOT, "tmpfs", NOSUID_NODEV, "mode=0755")
    for i, m in enumerate(mounts):
        apply_mount(m, trees.get(i))
    # The host root goes first, then the scaffold tmpfs under the new root goes with it.
    umount2(OLDROOT, MNT_DETACH)
    chdir(NEWROOT)
    try:
        pivot_root(".", ".")
    except OSError as exc:
        raise SetupError("mount", "pivot_root", NEWROOT, exc.errno) from None
    umount2(".", MNT_DETACH)
    chdir("/")
    # The new root itself is read-only: the kernel writes only where the plan allows.
    _setattr("/", RO_TOP, recursive=False)
    enter_cwd(cwd)


def enter_cwd(cwd):
    """chdir into the notebook's folder inside (init, and the prestarted interpreter that
    joins it)."""
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise SetupError("mount", "chdir", cwd, exc.errno, (
            f"the sandbox runs as uid {os.getuid()}, which may not enter the working "
            "directory; let it (chmod o+rx) or start Jupyter elsewhere")) from None


def apply_mount(m, tree):
    dest = NEWROOT + m.dest
    if m.op is Op.SYMLINK:
        parent = mount_point(os.path.dirname(m.dest), True)
        try:
            os.symlink(m.data, os.path.basename(dest), dir_fd=parent)
        except OSError as exc:
            raise SetupError("mount", "symlink", dest, exc.errno) from None
        finally:
            os.close(parent)
        return
    if m.op is Op.SEAL:
        _setattr(dest, RO_TOP, recursive=False)
        return
    if m.op in (Op.BIND, Op.DEVICE):
        tree_fd, is_dir = tree
        try:
            at = mount_point(m.dest, is_dir)
            try:
                move_mount(tree_fd, dest, at)
            except OSError as exc:
                raise SetupError("mount", f"bind {m.source} on {m.dest}", m.dest,
                                 exc.errno) from None
            finally:
                os.close(at)
            if m.op is Op.BIND:
                _setattr(dest, m.attrs, fd=tree_fd)
        finally:
            os.close(tree_fd)
        return
    # Absent on the host, or behind a dir the sandbox's uid cannot enter (root's 0700
    # home), or a link: nothing to hide there, the kernel cannot reach it either.
    at = mount_point(m.dest, True, create=m.op is not Op.HIDE)
    if at is None:
        return
    fstype, flags = FILESYSTEMS[m.op]
    if MountAttr.MOUNT_ATTR_RDONLY in m.attrs:
        flags |= MountFlags.MS_RDONLY
    try:
        # On the dir found, by its fd (the host's /proc, still at /oldroot), not its name.
        _mount(fstype, f"{OLDROOT}/proc/self/fd/{at}", fstype, flags, m.data or None,
               what=f"mount {fstype} on {m.dest}", shown=m.dest)
    finally:
        os.close(at)
