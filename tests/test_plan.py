"""The plan is a pure function of settings and host facts: checked without privileges."""
import pytest

from ns_kernel.config import Sandbox
from ns_kernel.sizes import parse_size
from ns_kernel.errors import SetupError
from ns_kernel.plan import RO, RW, Host, Mount, Op, build_plan


def host(**kw):
    facts = dict(uid=1000, gid=1000, home="/home/ada", cwd="/home/ada/notebooks",
                 environ=(("PATH", "/usr/bin"), ("JUPYTERHUB_API_TOKEN", "t"),
                          ("SSH_AUTH_SOCK", "/run/ssh"), ("MY_API_KEY", "k"), ("LANG", "C")),
                 python_paths=("/home/ada/.venv", "/usr/lib/python3.11"),
                 symlinks=(("/bin", "usr/bin"), ("/lib", "usr/lib")),
                 missing=frozenset({"/lib32", "/libx32", "/opt"}),
                 runtime_dirs=("/home/ada/.local/share/jupyter/runtime", "/run/user/1000"),
                 landlock=6)
    facts.update(kw)
    return Host(**facts)


def plan(sandbox=None, **kw):
    return build_plan(sandbox or Sandbox(), host(**kw), ["/usr/bin/python3"],
                      "/run/user/1000/ns-kernel/abc", "0123456789abcdef")


def by_dest(p):
    return {m.dest: m for m in p.mounts}


def test_ordinary_user_keeps_their_uid():
    p = plan()
    assert (p.uid, p.gid, p.uid_map.line(), p.drop_groups) == (1000, 1000, "1000 1000 1\n", False)


def test_root_maps_to_nobody_and_drops_groups():
    p = plan(uid=0, gid=0, home="/root", cwd="/srv/nb")
    assert p.uid_map.line() == "65534 65534 1\n" and p.gid_map.line() == "65534 65534 1\n"
    assert p.drop_groups


IDMAP = Sandbox(idmap_folder=True)


def test_root_sees_its_folder_through_an_id_map():
    """Asked to (--idmap-folder), root's kernel (nobody) is shown the folder root owns
    through an id map: root's files are the kernel's there, and a dir the host reads below
    it (a .git, read-only) is pinned through the same map, so the folder stays the
    kernel's to write."""
    root = dict(uid=0, gid=0, home="/root", cwd="/srv/course/autograded/alice/ps1",
                cwd_owner=(0, 0), initial_userns=True,
                repos=("/srv/course/autograded/alice/ps1/sub/.git",))
    assert by_dest(plan(**root))[root["cwd"]].idmap is None     # not unless asked
    mounts = by_dest(plan(IDMAP, **root))
    folder = mounts["/srv/course/autograded/alice/ps1"]
    assert folder.idmap == ((0, 65534), (0, 65534)) and folder.attrs == RW
    assert mounts["/srv/course/autograded/alice/ps1/sub"].idmap == folder.idmap
    assert mounts["/srv/course/autograded/alice/ps1/sub/.git"].idmap is None
    # Another user's folder: that user's files.
    assert by_dest(plan(IDMAP, **{**root, "cwd_owner": (1000, 100)}))[root["cwd"]].idmap == \
        ((1000, 65534), (100, 65534))


ROOT = dict(uid=0, gid=0, home="/root", initial_userns=True)


@pytest.mark.parametrize("why, sandbox, facts", [
    ("an ordinary user's own folder", None, dict(cwd_owner=(1000, 1000))),
    ("root of a container", None, dict(ROOT, initial_userns=False, cwd="/srv/nb",
                                       cwd_owner=(0, 0))),
    ("the kernel's own uid owns it", None, dict(ROOT, cwd="/srv/nb", cwd_owner=(65534, 65534))),
    ("a folder of the system's", None, dict(ROOT, cwd="/etc/nginx", cwd_owner=(0, 0))),
    ("under /var", None, dict(ROOT, cwd="/var/lib/x", cwd_owner=(0, 0))),
    ("a dot entry of the home", None, dict(ROOT, cwd="/root/.ssh", cwd_owner=(0, 0))),
    ("no seccomp filter to keep setuid bits off", Sandbox(seccomp="off", idmap_folder=True),
     dict(ROOT, cwd="/srv/nb", cwd_owner=(0, 0))),
    # A red team's: root's kernel started in another user's home wrote its .bashrc and
    # .ssh as that user; with $HOME elsewhere (sudo -E), root's own home was the folder.
    ("another user's home", None, dict(ROOT, cwd="/home/bob", cwd_owner=(1001, 1001),
                                       homes=("/home/bob", "/root"))),
    ("a dot entry of another user's home", None,
     dict(ROOT, cwd="/home/bob/.config/x", cwd_owner=(1001, 1001), homes=("/home/bob",))),
    ("root's home, $HOME elsewhere", None,
     dict(ROOT, home="/srv/elsewhere", cwd="/root", cwd_owner=(0, 0), homes=("/root",))),
])
def test_no_id_map(why, sandbox, facts):
    mounts = by_dest(plan(sandbox or IDMAP, **facts))
    assert mounts[facts.get("cwd", "/home/ada/notebooks")].idmap is None, why


def test_the_default_filter_refuses_setuid_and_setgid_modes():
    """The bits ride in the mode argument of each call that sets one (chmod's second,
    fchmodat's third, openat's fourth ...); openat2 hides it in a struct: ENOSYS."""
    from ns_kernel import seccomp
    rules = seccomp.default_filter().rules
    refused = {(name, rule.args) for rule in rules[1:-1] for name in rule.names}
    masked = seccomp.COMPARE["SCMP_CMP_MASKED_EQ"]
    for name, index in (("chmod", 1), ("fchmodat", 2), ("openat", 3), ("creat", 1),
                        ("fchmodat2", 2), ("mknodat", 2)):
        for bit in (0o4000, 0o2000):
            assert (name, ((index, masked, bit, bit),)) in refused, (name, oct(bit))
    assert rules[-1] == seccomp.Rule(("openat2",), seccomp.SCMP_ACT_ERRNO(38))
    # Without Landlock mknod is refused whatever its mode: not twice.
    bare = seccomp.default_filter(no_links=True)
    assert all("mknodat" not in rule.names for rule in bare.rules[1:-1])


def test_root_inside_is_refused_for_host_root():
    with pytest.raises(SetupError, match="host root is never root inside"):
        plan(Sandbox(sandbox_uid=0), uid=0)


def test_mount_order_and_modes():
    p = plan()
    mounts = by_dest(p)
    assert mounts["/usr"].op is Op.BIND and mounts["/usr"].attrs == RO
    assert mounts["/bin"].op is Op.SYMLINK and mounts["/bin"].data == "usr/bin"
    assert "/opt" not in mounts
    assert mounts["/tmp"].op is Op.TMPFS and "size=1G" in mounts["/tmp"].data
    state = "/home/ada/.local/share/ns-kernel/isolated-python"
    assert mounts["/home/ada"] == Mount(Op.BIND, "/home/ada", source=f"{state}/home", attrs=RW)
    assert p.state_dirs == (f"{state}/home",)
    assert mounts["/home/ada/.venv"].attrs == RO                     # the venv shows through
    assert mounts["/home/ada/notebooks"].attrs == RW
    assert mounts["/run/ns-kernel"].source == "/run/user/1000/ns-kernel/abc"
    dests = [m.dest for m in p.mounts]
    # The home is mounted before the venv and the notebook folder inside it.
    assert dests.index("/home/ada") < dests.index("/home/ada/.venv")
    assert dests.index("/home/ada") < dests.index("/home/ada/notebooks")
    assert dests.index("/proc") > dests.index("/dev")
    # What vanishes with the sandbox, and is reported when the kernel ends.
    assert p.discarded == (("/tmp", False), ("/var/tmp", False), ("/dev/shm", False))


def test_private_home_is_a_tmpfs_and_is_reported():
    p = plan(Sandbox(home="private"))
    assert by_dest(p)["/home/ada"].op is Op.TMPFS
    assert p.state_dirs == ()
    assert p.discarded[-1] == ("/home/ada", True)


def test_state_per_kernelspec_name_and_data_home():
    p = plan(Sandbox(kernel_name="course-2g"), data_home="/data/ada")
    assert p.state_dirs == ("/data/ada/ns-kernel/course-2g/home",)
    p = plan(Sandbox(state_dir="/srv/state"))
    assert by_dest(p)["/home/ada"].source == "/srv/state/isolated-python/home"


VENV = dict(venv="/opt/venv", python_paths=("/opt/venv", "/opt/venv/lib/python3.11/site-packages"),
            venv_entries=(("bin", ""), ("lib", ""), ("lib64", "lib"), ("pyvenv.cfg", None)))


def test_a_venv_gets_the_kernelspecs_packages_at_venv_user():
    p = plan(**VENV)
    state = "/home/ada/.local/share/ns-kernel/isolated-python"
    dests = [m.dest for m in p.mounts]
    at = dests.index("/opt/venv")
    assert p.mounts[at:at + 7] == (
        Mount(Op.TMPFS, "/opt/venv", data="mode=0755,size=64k"),
        Mount(Op.BIND, "/opt/venv/bin", source="/opt/venv/bin", attrs=RO),
        Mount(Op.BIND, "/opt/venv/lib", source="/opt/venv/lib", attrs=RO),
        Mount(Op.SYMLINK, "/opt/venv/lib64", data="lib"),
        Mount(Op.BIND, "/opt/venv/pyvenv.cfg", source="/opt/venv/pyvenv.cfg", attrs=RO),
        Mount(Op.BIND, "/opt/venv/user", source=f"{state}/packages", attrs=RW),
        Mount(Op.SEAL, "/opt/venv"))
    assert "/opt/venv/lib/python3.11/site-packages" not in dests     # shown by the skeleton
    assert sorted(p.state_dirs) == [f"{state}/home", f"{state}/packages"]
    site = f"/opt/venv/user/lib/python{__import__('sys').version_info[0]}." \
           f"{__import__('sys').version_info[1]}/site-packages"
    env = dict(p.env)
    assert p.package_paths == (site,)
    assert env["PYTHONPATH"] == site and env["PIP_PREFIX"] == "/opt/venv/user"
    assert env["PATH"] == "/opt/venv/user/bin:/usr/bin"
    # Ahead of what the caller had on PYTHONPATH.
    p = plan(**VENV, environ=(("PYTHONPATH", "/srv/lib"), ("PATH", "/usr/bin")))
    assert dict(p.env)["PYTHONPATH"] == f"{site}:/srv/lib"


def test_without_a_persistent_home_installed_packages_go_with_the_kernel():
    # One kernel's packages must not reach the next where nothing else does (graders).
    p = plan(Sandbox(home="private"), **VENV)
    assert by_dest(p)["/opt/venv/user"].op is Op.TMPFS
    assert p.state_dirs == ()
    assert (p.package_paths[0], False) in p.discarded


def test_a_home_on_the_launchers_path_is_refused():
    # PYTHONPATH=$PYTHONPATH:/x leaves an empty entry: the current folder, here the home.
    for facts in (dict(cwd="/home/ada", python_paths=("/home/ada",)),
                  dict(python_paths=("/home/ada",)), dict(python_paths=("/home",))):
        with pytest.raises(SetupError, match="sys.path entry /home"):
            plan(**facts)


def test_a_venv_entry_named_user_is_refused():
    with pytest.raises(SetupError, match="/opt/venv/user exists"):
        plan(**{**VENV, "venv_entries": (("user", ""),)})


HOME_ENTRIES = (("notebooks", ""), ("bin", ""), ("data", "/srv/data"), ("notes.txt", None),
                (".ssh", ""), (".bashrc", None), (".jupyter", ""), (".local", ""))


def test_home_shown_without_its_dot_entries():
    for mode, attrs in (("shared", RW), ("readonly", RO)):
        p = plan(Sandbox(home=mode), home_entries=HOME_ENTRIES)
        home = [m for m in p.mounts if m.dest.startswith("/home/ada") and
                not m.dest.startswith("/home/ada/.venv")]
        assert home[:5] == [
            Mount(Op.TMPFS, "/home/ada", data="mode=0755,size=64k"),
            Mount(Op.BIND, "/home/ada/notebooks", source="/home/ada/notebooks", attrs=attrs),
            Mount(Op.BIND, "/home/ada/bin", source="/home/ada/bin", attrs=RO),   # on PATH
            Mount(Op.SYMLINK, "/home/ada/data", data="/srv/data"),
            Mount(Op.BIND, "/home/ada/notes.txt", source="/home/ada/notes.txt", attrs=attrs)]
        assert p.mounts[-1] == Mount(Op.SEAL, "/home/ada")     # no new entry at the top
        assert not [m for m in p.mounts if m.dest.startswith("/home/ada/.")
                    and not m.dest.startswith("/home/ada/.venv")]
        assert dict(p.env)["HOME"] == "/home/ada"


def test_notebook_in_the_home_folder():
    # JupyterLab's default: the notebook folder is the home. Its files are the kernel's,
    # its dot entries are not; $HOME is the sandbox's own home, beside them.
    p = plan(cwd="/home/ada", home_entries=HOME_ENTRIES)
    mounts = by_dest(p)
    assert [m.op for m in p.mounts if m.dest == "/home/ada"] == [Op.TMPFS, Op.SEAL]
    assert mounts["/home/ada/notebooks"].attrs == RW
    assert mounts["/home/ada/notes.txt"].attrs == RW
    assert mounts["/home/ada/bin"].attrs == RO
    assert mounts["/home/ada/.isolated-home"] == Mount(
        Op.BIND, "/home/ada/.isolated-home",
        source="/home/ada/.local/share/ns-kernel/isolated-python/home", attrs=RW)
    assert dict(p.env)["HOME"] == "/home/ada/.isolated-home"
    assert "/home/ada/.ssh" not in mounts and "/home/ada/.jupyter" not in mounts
    assert [m for m in p.mounts if m.source == "/home/ada"] == []    # never the whole home
    assert p.mounts[-1] == Mount(Op.SEAL, "/home/ada")
    p = plan(Sandbox(home="private"), cwd="/home/ada", home_entries=HOME_ENTRIES)
    assert by_dest(p)["/home/ada/.isolated-home"].op is Op.TMPFS


@pytest.mark.parametrize("facts, fragment", [
    (dict(cwd="/tmp", cwd_shared=True), "every user may write it"),
    (dict(cwd="/home", homes=("/home/ada", "/home/bob")), "it holds /home/ada and other homes"),
    (dict(cwd="/srv", home="/srv/ada", homes=("/srv/ada",)), "it holds /srv/ada,"),
    (dict(cwd="/home/ada/.jupyter/nb", config_paths=(("/home/ada/.jupyter", True),)),
     "it lies in /home/ada/.jupyter"),
])
def test_folders_that_are_not_the_users_to_share_are_refused(facts, fragment):
    with pytest.raises(SetupError, match=fragment):
        plan(**facts)


def test_configuration_in_a_writable_folder_is_read_only_or_refused():
    p = plan(config_paths=(("/home/ada/notebooks/share/jupyter", True),
                           ("/home/ada/.jupyter", True), ("/etc/jupyter", True)))
    dests = [m.dest for m in p.mounts]
    assert by_dest(p)["/home/ada/notebooks/share/jupyter"].attrs == RO
    assert dests.index("/home/ada/notebooks/share/jupyter") > dests.index("/home/ada/notebooks")
    assert "/home/ada/.jupyter" not in dests and "/etc/jupyter" not in dests
    with pytest.raises(SetupError, match="would be the kernel's to create"):
        plan(config_paths=(("/home/ada/notebooks/etc/jupyter", False),))
    with pytest.raises(SetupError, match="/srv/x/.ipython would be the kernel's to create"):
        plan(Sandbox(rw_binds=["/srv/x"]), config_paths=(("/srv/x/.ipython", False),))
    # Under a read-only view of a writable folder (a venv there) nothing can be created.
    plan(python_paths=("/home/ada/notebooks/.venv",),
         config_paths=(("/home/ada/notebooks/.venv/etc/jupyter", False),))


def test_the_notebook_folders_git_is_obeyed_by_the_host_so_read_only():
    # All of it: git obeys more than hooks and config (commondir, config.worktree,
    # modules/*/config), some of which do not exist until the kernel would make them.
    mounts = by_dest(plan(repos=("/home/ada/notebooks/.git",)))
    assert mounts["/home/ada/notebooks/.git"].attrs == RO
    assert not any(dest.startswith("/home/ada/notebooks/.git/") for dest in mounts)
    assert "/home/ada/notebooks/.git" not in by_dest(plan())
    # The user's projects below a notebook in the home, pinned where they are.
    mounts = by_dest(plan(cwd="/home/ada", home_entries=(("code", ""),),
                          repos=("/home/ada/.git", "/home/ada/code/proj/.git")))
    assert mounts["/home/ada/code/proj/.git"].attrs == RO
    assert mounts["/home/ada/code/proj"].attrs == RW
    assert "/home/ada/.git" not in mounts       # a dot entry: not shown at all
    # In a read-only view already (a venv in the folder): nothing more.
    p = plan(python_paths=("/home/ada/notebooks/.venv",),
             repos=("/home/ada/notebooks/.venv/src/x/.git",))
    assert "/home/ada/notebooks/.venv/src/x/.git" not in by_dest(p)


def test_what_the_host_reads_below_a_writable_folder_cannot_be_moved_away():
    # A kernel may rename a dir that merely holds a read-only mount, taking the mount
    # with it, and make a fresh one where the host reads: each dir between the writable
    # folder and the read-only mount is a mount point itself, which Linux will not rename.
    p = plan(python_paths=("/home/ada/notebooks/src/lib", "/usr/lib/python3.11"))
    dests = [m.dest for m in p.mounts]
    pin = by_dest(p)["/home/ada/notebooks/src"]
    assert pin.op is Op.BIND and pin.source == pin.dest and pin.attrs == RW
    assert dests.index("/home/ada/notebooks") < dests.index("/home/ada/notebooks/src") \
        < dests.index("/home/ada/notebooks/src/lib")
    assert by_dest(p)["/home/ada/notebooks/src/lib"].attrs == RO
    # Every level, once, whatever holds several: parents before children.
    p = plan(python_paths=("/home/ada/notebooks/a/b/c", "/home/ada/notebooks/a/d"),
             config_paths=(("/home/ada/notebooks/a/b/etc/jupyter", True),))
    pins = [m.dest for m in p.mounts if m.dest in ("/home/ada/notebooks/a",
                                                    "/home/ada/notebooks/a/b")]
    assert pins == ["/home/ada/notebooks/a", "/home/ada/notebooks/a/b"]
    # A notebook folder that is the home: below a writable entry of it too.
    p = plan(cwd="/home/ada", python_paths=("/home/ada/proj/src/lib",),
             home_entries=(("proj", ""),))
    assert by_dest(p)["/home/ada/proj/src"].attrs == RW
    # Nothing read-only below the folder, nothing pinned.
    assert [m.dest for m in plan().mounts if m.dest.startswith("/home/ada/notebooks/")] == []


def test_a_search_path_entry_the_kernel_could_create_is_refused():
    for missing, sandbox in (("/home/ada/notebooks/src/lib", Sandbox()),
                             ("/srv/data/site", Sandbox(rw_binds=["/srv/data"]))):
        with pytest.raises(SetupError, match=f"sys.path entry {missing} does not exist.*"
                                             "the kernel could create it"):
            plan(sandbox, unbuilt_paths=(missing,))
    plan(unbuilt_paths=("/usr/lib/python311.zip", "/srv/lib"))     # where it may not write


def test_the_admins_binds_are_mounted_from_their_real_paths():
    p = plan(Sandbox(ro_binds=["/data/ref"], rw_binds=["/scratch/"]),
             binds=(("/data/ref", "/mnt/disk1/ref"), ("/scratch/", "/scratch")))
    mounts = by_dest(p)
    assert mounts["/mnt/disk1/ref"].source == "/mnt/disk1/ref" and "/data/ref" not in mounts
    assert mounts["/scratch"].attrs == RW
    # Inside the notebook folder a read-only bind stays read-only; a folder inside a
    # writable bind stays shown: each after the one it lies in.
    p = plan(Sandbox(ro_binds=["/srv/course/nb/data"], rw_binds=["/srv"]), cwd="/srv/course/nb")
    dests = [m.dest for m in p.mounts]
    assert dests.index("/srv") < dests.index("/srv/course/nb") \
        < dests.index("/srv/course/nb/data")
    # The dir between the two writable binds is pinned too: the folder cannot be moved.
    assert dests.index("/srv") < dests.index("/srv/course") < dests.index("/srv/course/nb")
    # The kernel's home on the host may not lie where it may write.
    with pytest.raises(SetupError, match="state dir /srv/state/isolated-python/home .it lies "
                                         "in /srv, which the kernel may write"):
        plan(Sandbox(rw_binds=["/srv"], state_dir="/srv/state"))
    with pytest.raises(SetupError, match=r"bind /data/ref \(it is / or a link to it"):
        plan(Sandbox(ro_binds=["/data/ref"]), binds=(("/data/ref", "/"),))


def test_links_only_where_the_host_reads_nothing():
    assert plan(cwd="/srv/nb").links_in == ("/tmp", "/var/tmp", "/dev/shm", "/home/ada")
    assert plan(Sandbox(home="private"), cwd="/srv/nb").links_in[-1] == "/home/ada"
    assert plan(Sandbox(home="shared"), cwd="/srv/nb").links_in == ("/tmp", "/var/tmp",
                                                                    "/dev/shm")
    assert plan(cwd="/home/ada").links_in[-1] == "/home/ada/.isolated-home"
    # A right granted on a dir holds on the binds below it too: not where the notebook
    # folder lies ($HOME's path here, /tmp there).
    assert plan().links_in == ("/tmp", "/var/tmp", "/dev/shm")
    assert plan(cwd="/tmp/nb").links_in == ("/var/tmp", "/dev/shm", "/home/ada")
    assert "/var/tmp" not in plan(Sandbox(rw_binds=["/var/tmp/shared"])).links_in
    # Without Landlock the default filter denies symlinks everywhere; no other can be
    # trusted to.
    from ns_kernel import seccomp
    bare = plan(landlock=0)
    assert bare.links_in is None and bare.seccomp == seccomp.default_filter(no_links=True)
    assert "symlinkat" in bare.seccomp.rules[0].names
    with pytest.raises(SetupError, match="without Landlock.*--seccomp default"):
        plan(Sandbox(seccomp="off"), landlock=0)


def test_runtime_dir_never_shown():
    # A shown home has no dot entries, so Jupyter's runtime dir is not there at all.
    assert "/home/ada/.local/share/jupyter/runtime" not in by_dest(plan(Sandbox(home="shared")))
    # With a home of the sandbox's own it is not visible at all: nothing to hide.
    assert "/home/ada/.local/share/jupyter/runtime" not in by_dest(plan())


def test_cwd_inside_a_hidden_dir_is_refused():
    with pytest.raises(SetupError, match="holds other kernels' secrets"):
        plan(cwd="/home/ada/.local/share/jupyter/runtime/x")


def test_cwd_root_is_refused():
    with pytest.raises(SetupError, match="would expose the whole host"):
        plan(cwd="/")


def test_environment_is_an_allowlist():
    environ = (("PATH", "/usr/bin"), ("LANG", "C"), ("DATABASE_URL", "postgres://u:p@db/x"),
               ("MYSQL_PWD", "pw"), ("GH_PAT", "ghp_x"), ("AZURE_STORAGE_CONNECTION_STRING",
               "AccountKey=k"), ("https_proxy", "http://user:pw@proxy:3128"),
               ("PIP_INDEX_URL", "https://user:pw@mirror/simple"),
               ("PIP_EXTRA_INDEX_URL", "https://mirror.example/simple"),
               ("PYTHONHASHSEED", "0"), ("OMP_NUM_THREADS", "2"), ("CUSTOM", "x"))
    env = dict(plan(environ=environ).env)
    assert sorted(env) == ["HOME", "JPY_PARENT_PID", "LANG", "OMP_NUM_THREADS", "PATH",
                           "PIP_EXTRA_INDEX_URL", "PIP_RETRIES",
                           "PYDEVD_DISABLE_FILE_VALIDATION", "PYTHONHASHSEED"]
    # No network to come back (loopback, the default): pip does not retry; one's own stays.
    assert env["PIP_RETRIES"] == "0"
    assert dict(plan(environ=(("PIP_RETRIES", "3"),)).env)["PIP_RETRIES"] == "3"
    assert "PIP_RETRIES" not in dict(plan(Sandbox(network="proxy")).env)
    env = dict(plan(Sandbox(env_keep=["CUSTOM", "PIP_INDEX_URL"]), environ=environ).env)
    assert env["CUSTOM"] == "x" and env["PIP_INDEX_URL"] == "https://user:pw@mirror/simple"


def test_env_patterns_match_as_fnmatch_does_case_insensitively():
    import fnmatch
    from ns_kernel.plan import env_pattern
    patterns = ("lc_*", "PY?HON*", "[AB]X", "*TOKEN*", "x.y", "CUDA_VISIBLE_DEVICES")
    names = ("LC_ALL", "lc_all", "Python3", "PYXHONX", "AX", "bx", "CX", "my_token_2", "X.Y",
             "XzY", "cuda_visible_devices", "CUDA_VISIBLE_DEVICES_2", "", "ß")
    for name in names:
        expected = any(fnmatch.fnmatchcase(name.upper(), p.upper()) for p in patterns)
        assert bool(env_pattern(patterns).match(name.upper())) == expected, name
    assert not any(env_pattern(()).match(name) for name in names)
    env = dict(plan(Sandbox(env_allow=[], env_keep=[]), environ=(("PATH", "/usr/bin"),)).env)
    assert "PATH" not in env


def test_environment_without_secrets():
    env = dict(plan().env)
    assert env["PATH"] == "/usr/bin" and env["LANG"] == "C" and env["JPY_PARENT_PID"] == "1"
    for secret in ("JUPYTERHUB_API_TOKEN", "SSH_AUTH_SOCK", "MY_API_KEY"):
        assert secret not in env


def test_hostname_from_kernel_id():
    assert plan().hostname == "isolated-01234567"


def test_network_modes():
    assert "/sys" in by_dest(plan(Sandbox(network="none")))
    assert plan(Sandbox(network="host")).network == "host"


@pytest.mark.parametrize("text, size", [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29),
                                        ("", 0), ("4096", 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_relative_bind_is_refused():
    with pytest.raises(SetupError, match="bind paths must be absolute"):
        plan(Sandbox(ro_binds=["data"]))


@pytest.mark.parametrize("sysctls, fragment", [
    ({"/proc/sys/kernel/unprivileged_userns_clone": "0"}, "kernel.unprivileged_userns_clone=1"),
    ({"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1"},
     "apparmor_restrict_unprivileged_userns=0"),
    ({"/proc/sys/user/max_user_namespaces": "0"}, "user.max_user_namespaces=15000"),
    ({"/proc/sys/user/max_user_namespaces": "1000"}, "seccomp filter"),
])
def test_userns_hint_names_the_sysctl(sysctls, fragment):
    from ns_kernel.user import userns_hint
    assert fragment in userns_hint(sysctls.get)


def test_launcher_code_the_kernel_could_write_is_refused_or_read_only():
    # The notebook folder itself on the launcher's sys.path (an empty PYTHONPATH entry):
    # whatever the kernel put there would run outside at the next start.
    with pytest.raises(SetupError, match="sys.path entry /home/ada/notebooks.*PYTHONPATH"):
        plan(python_paths=("/home/ada/notebooks", "/usr/lib/python3.11"))
    with pytest.raises(SetupError, match="sys.path entry /srv/lib"):
        plan(Sandbox(rw_binds=["/srv/lib"]), python_paths=("/srv/lib",))
    # A venv inside the notebook folder: bound read-only after (on top of) the folder.
    p = plan(python_paths=("/home/ada/notebooks/.venv", "/usr/lib/python3.11"))
    dests = [m.dest for m in p.mounts]
    venv = by_dest(p)["/home/ada/notebooks/.venv"]
    assert venv.op == Op.BIND and venv.attrs == RO
    assert dests.index("/home/ada/notebooks/.venv") > dests.index("/home/ada/notebooks")
    # Above the folder (a parent on sys.path): read-only below it, the folder stays writable.
    p = plan(python_paths=("/srv",), cwd="/srv/notebooks", home="/home/ada")
    dests = [m.dest for m in p.mounts]
    assert dests.index("/srv") < dests.index("/srv/notebooks")
    assert by_dest(p)["/srv/notebooks"].attrs == RW


PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
    "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                 "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
    "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_PTRACE"]}},
        {"names": ["ancient"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "4.8"}},
        {"names": ["modern"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                  {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"},
                  {"index": 1, "value": 5, "op": "SCMP_CMP_GT"}]},
        {"names": ["kill"], "action": "SCMP_ACT_ERRNO"},          # the default again
        {"names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ]}


def test_a_docker_profile_as_runc_applies_it_to_a_process_without_capabilities():
    import os
    from ns_kernel import seccomp
    f = seccomp.from_profile(PROFILE)
    rules = {r.names[0]: r for r in f.rules}
    assert f.default == seccomp.SCMP_ACT_ERRNO(1)
    assert "mount" not in rules and "ptrace" in rules      # a kernel has no capabilities
    assert "ancient" not in rules and "modern" in rules     # this host runs Linux >= 4.8
    assert "kill" not in rules                              # repeats the default
    assert rules["uname"].action == seccomp.SCMP_ACT_ERRNO(38)
    # Two conditions on one argument: either holds (two rules); on two arguments: both.
    assert [r.args for r in f.rules if r.names == ("personality",)] == [((0, 4, 0, 0),), ((0, 4, 8, 0),)]
    assert rules["clone"].args == ((0, 7, 2114060288, 0), (1, 6, 5, 0))
    own = {"x86_64": ("x86", "x32"), "aarch64": ("arm",)}.get(os.uname().machine)
    assert f.arches == own


@pytest.mark.parametrize("profile, fragment", [
    ({"syscalls": []}, "no defaultAction"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "SCMP_ACT_NOTIFY needs a tracer or listener"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_TRACE"}]}, "SCMP_ACT_TRACE needs"),
    ({"defaultAction": "SCMP_ACT_BOGUS"}, "unknown action SCMP_ACT_BOGUS"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "op": "LIKE"}]}]},
     "unknown comparison LIKE"),
])
def test_a_profile_we_cannot_apply_faithfully_is_refused(profile, fragment):
    from ns_kernel import seccomp
    with pytest.raises(SetupError) as err:
        seccomp.from_profile(profile, "/etc/p.json")
    assert str(err.value).startswith("ns-kernel: seccomp profile /etc/p.json (")
    assert fragment in str(err.value)


def test_a_profile_file_someone_else_may_change_is_refused(tmp_path):
    import json
    import os
    from ns_kernel import seccomp
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    assert seccomp.read_profile(str(path)).source == str(path)
    for mode, fragment in ((0o664, "another user may change it"),
                           (0o646, "another user may change it")):
        path.chmod(mode)
        with pytest.raises(SetupError, match=fragment):
            seccomp.read_profile(str(path))
    path.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(path)           # resolved once: the admin's symlinks work
    assert seccomp.read_profile(str(link)).source == str(path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SetupError, match="not JSON"):
        seccomp.read_profile(str(tmp_path / "bad.json"))
    with pytest.raises(SetupError, match="not a regular file"):
        seccomp.read_profile(str(tmp_path))
    with pytest.raises(SetupError, match="No such file"):
        seccomp.read_profile(str(tmp_path / "none.json"))
    os.chmod(tmp_path, 0o700)


def test_a_profile_the_kernel_may_write_is_refused():
    from dataclasses import replace
    from ns_kernel import seccomp
    profile = seccomp.from_profile(PROFILE)
    for where in ("/home/ada/notebooks/p.json", "/data/p.json",
                  "/home/ada/.local/share/ns-kernel/isolated-python/home/p.json"):
        with pytest.raises(SetupError, match="which the kernel may write"):
            build_plan(Sandbox(seccomp="/x/p.json", rw_binds=["/data"]), host(),
                       ["/usr/bin/python3"], "/run/user/1000/ns-kernel/abc", "ab",
                       replace(profile, source=where))
    kept = build_plan(Sandbox(seccomp="/x/p.json"), host(), ["/usr/bin/python3"],
                      "/run/user/1000/ns-kernel/abc", "ab", replace(profile, source="/etc/p.json"))
    assert kept.seccomp.source == "/etc/p.json"
    assert plan(Sandbox(seccomp="off")).seccomp is None
    assert plan().seccomp == seccomp.default_filter()
    assert "unshare" not in plan(Sandbox(allow_userns=True)).seccomp.rules[0].names


def test_seccomp_setting_is_a_keyword_or_an_absolute_path():
    from traitlets import TraitError
    assert Sandbox(seccomp="OFF").seccomp == "off"
    with pytest.raises(TraitError, match="absolute path of a Docker/OCI seccomp profile"):
        Sandbox(seccomp="profile.json")


def test_a_failed_syscall_names_itself_in_the_one_line_error():
    """Not a catch-all 'sandbox setup' with only a path (bubblewrap's die_with_error)."""
    from ns_kernel import syscalls
    for call, expected in ((lambda: syscalls.umount2("/nonexistent-ns-kernel"),
                            "ns-kernel: umount2 /nonexistent-ns-kernel: "),
                           (lambda: syscalls.chdir("/nonexistent-ns-kernel"),
                            "ns-kernel: chdir /nonexistent-ns-kernel: No such file or directory"),
                           (lambda: syscalls.prctl(syscalls.PR_SET_DUMPABLE, 7),
                            "ns-kernel: prctl(PR_SET_DUMPABLE): Invalid argument"),
                           (lambda: syscalls.setns(-1, syscalls.CloneFlags.CLONE_NEWNS
                                                   | syscalls.CloneFlags.CLONE_NEWUTS),
                            "ns-kernel: setns(CLONE_NEWNS|CLONE_NEWUTS): Bad file descriptor")):
        with pytest.raises(OSError) as err:
            call()
        line = str(SetupError.from_exception(err.value, "sandbox", "sandbox setup"))
        assert line.startswith(expected), line


@pytest.mark.parametrize("argv, options, socket_dir", [
    (["-f", "c.json"], [], ""),
    (["--network=host", "--kernel-socket-dir=/run/x", "-f", "c.json"], ["--network=host"], "/run/x"),
    (["--kernel-socket-dir", "/run/x", "--warm", "-f", "c.json"], [], "/run/x"),
    (["--KernelApp.kernel_socket_dir=/run/y", "-f", "c.json"], [], "/run/y"),
    # Anything else stays for traitlets to refuse, as it always has: no value, an option
    # where the value goes, an empty one, twice.
    (["--kernel-socket-dir", "-f", "c.json"], ["--kernel-socket-dir"], ""),
    (["--kernel-socket-dir", "--cold", "-f", "c.json"], ["--kernel-socket-dir"], ""),
    (["--kernel-socket-dir=", "-f", "c.json"], ["--kernel-socket-dir="], ""),
    (["--kernel-socket-dir=/a", "--kernel-socket-dir=/b", "-f", "c.json"],
     ["--kernel-socket-dir=/a", "--kernel-socket-dir=/b"], ""),
])
def test_a_kernel_starts_command_line(argv, options, socket_dir):
    # The provisioner's --kernel-socket-dir is read with the connection file, so that a
    # start with no other option needs no argparse; and it goes on to a warm template.
    from ns_kernel.argv import kernel_start
    start = kernel_start(argv)
    assert (start.options, start.socket_dir, start.connection_file) == (options, socket_dir,
                                                                         "c.json")
    again = kernel_start(start.argv())
    assert (again.options, again.socket_dir) == (options, socket_dir)
