"""JupyterHub with DockerSpawner on a real Docker daemon (Debian's docker.io), as a hub admin
sets it up from docs/containers.md: the image built by the docs' own commands from
containers/Containerfile, the doctor in it as jovyan and as root with only the capabilities
the docs name, then a hub (dummy authenticator, npm's configurable-http-proxy) whose
DockerSpawner settings are the docs' snippet as written, two users' servers from the image,
and Isolated Python kernels in them through the hub's REST and websocket API.

Tier `container`: scripts/test-containers (root) installs docker.io, starts a daemon of its
own (DOCKER_HOST) with a bridge of its own, imports a Debian bookworm-slim made here as
`debian:bookworm-slim` (no registry), installs npm's proxy (NS_KERNEL_CHP), and stops and
removes all of it at the end but its caches."""
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

from test_jupyterlab import Channels, Server, answers, assert_sandboxed, free_port, wait_for

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "containers.md")
BIN = os.path.dirname(sys.executable)
IMAGE = "isolated-python"


def docs_blocks(language):
    """The docs' code blocks in `language`, as written."""
    with open(DOCS) as f:
        return re.findall(rf"^```{language}\n(.*?)^```$", f.read(), re.S | re.M)


def docker_client():
    import docker
    return docker.from_env()


@pytest.fixture(scope="module")
def built():
    """The docs' `docker build` and `docker run ... ns-kernel doctor` block, run as written
    from this checkout; its output."""
    if not os.environ.get("DOCKER_HOST") or not shutil.which("docker"):
        pytest.fail("no Docker daemon of the tier's (DOCKER_HOST): run scripts/test-containers")
    [block] = [b for b in docs_blocks("sh") if b.startswith("docker ")]
    done = subprocess.run(["sh", "-ec", block], cwd=REPO, capture_output=True, text=True,
                          timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_docs_build_the_image_and_its_doctor_passes(built):
    # Twice the doctor: as jovyan (prestarted kernels), then as root with only CHOWN,
    # SETUID, SETGID (exec'd: no CAP_SYS_PTRACE); every way a kernel starts, both times.
    assert built.count("ns-kernel doctor: isolated kernels can run here.") == 2, built
    assert built.count("  ok    kernel (provisioner): warm, pid 2 of 2 processes") == 2
    assert "  ok    kernel (cold): prestarted, pid 2 of 2 processes" in built
    assert "  ok    kernel (cold): exec, pid 2 of 2 processes" in built
    assert "uid 1000, network lo" in built and "uid 65534, network lo" in built
    # The image's default kernel is Isolated Python.
    out = subprocess.run(["docker", "run", "--rm", IMAGE, "jupyter", "kernelspec", "list",
                          "--json"], capture_output=True, text=True, timeout=120, check=True)
    assert "isolated-python" in json.loads(out.stdout)["kernelspecs"]


def test_docker_refuses_the_cli_name_in_security_opt(built):
    # Why the docs' DockerSpawner snippet sends HostConfig.MaskedPaths: docker-py passes
    # security_opt on as is, and the daemon does not know the CLI's systempaths=unconfined.
    import docker
    client = docker_client()
    with pytest.raises(docker.errors.APIError, match="systempaths"):
        client.containers.create(IMAGE, "true", security_opt=["systempaths=unconfined"])


HUB_CONFIG = """
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
# The users' containers reach the hub's API on the tier's Docker bridge.
c.JupyterHub.hub_bind_url = "http://{bridge}:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.JupyterHub.db_url = "sqlite:///{top}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{top}/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "docker"
# A spawn request answers at once (not after 10 s): both users' servers start together.
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.remove = True
c.DockerSpawner.name_template = "ns-kernel-test-{{username}}"
c.JupyterHub.services = [{{"name": "tester", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "tester", "services": ["tester"], "scopes": [
    "admin:users", "admin:servers", "access:servers"]}}]
"""


def unpolled(log):
    with open(log) as f:
        return "".join(line for line in f if "GET /hub/api/users/" not in line)[-6000:]


def container_log(client, user):
    try:
        return client.containers.get(f"ns-kernel-test-{user}").logs().decode()[-6000:]
    except Exception as exc:  # noqa: BLE001 - what there is to say, for the failure's text
        return repr(exc)


def test_dockerspawner_hub_with_the_docs_settings(built):
    chp = os.environ.get("NS_KERNEL_CHP")
    if not chp:
        pytest.fail("no configurable-http-proxy from npm (NS_KERNEL_CHP): run "
                    "scripts/test-containers")
    client = docker_client()
    bridge = client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    top = tempfile.mkdtemp(prefix="ns-kernel-dockerhub-")
    hub = Server(f"http://127.0.0.1:{free_port()}/hub/api", secrets.token_hex(16))
    [snippet] = [b for b in docs_blocks("python") if "DockerSpawner" in b]
    shutil.copy(os.path.join(REPO, "ns_kernel", "container-seccomp.json"), top)
    config = os.path.join(top, "jupyterhub_config.py")
    with open(config, "w") as f:
        f.write(HUB_CONFIG.format(port=hub.url.split(":")[2].split("/")[0], bridge=bridge,
                                  hub_port=free_port(), proxy_port=free_port(), proxy=chp,
                                  top=top, token=hub.token))
        f.write(snippet)
    log = os.path.join(top, "hub.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([os.path.join(BIN, "jupyterhub"), "-f", config], cwd=top,
                                stdout=out, stderr=subprocess.STDOUT)
    users = ["alice", "bob"]
    try:
        wait_for("JupyterHub", lambda: answers(hub, "/"), proc, log)
        servers = {}
        for user in users:      # both spawns at once, as users come
            hub.api("POST", f"/users/{user}")
            hub.api("POST", f"/users/{user}/server")
        for user in users:
            try:
                wait_for(f"{user}'s server", lambda: hub.api("GET", f"/users/{user}")
                         ["servers"].get("", {}).get("ready"), proc, log, timeout=180)
            except RuntimeError:
                raise RuntimeError(f"{user}'s server did not start: the hub's log, but its "
                                   f"polls:\n{unpolled(log)}\nits container's:\n"
                                   f"{container_log(client, user)}") from None
            servers[user] = Server(hub.url.replace("/hub/api", f"/user/{user}"), hub.token)
        # What DockerSpawner asked Docker for: the docs' settings, as `docker run` sends them.
        settings = client.api.inspect_container("ns-kernel-test-alice")["HostConfig"]
        assert settings["MaskedPaths"] == [] and settings["ReadonlyPaths"] == []
        assert [o[:9] for o in settings["SecurityOpt"]] == ["seccomp={"]
        alice_ip = client.api.inspect_container("ns-kernel-test-alice")["NetworkSettings"][
            "Networks"]["bridge"]["IPAddress"]

        async def main():
            # The image's default kernel (no name given): Isolated Python. Two in alice's
            # server, one in bob's.
            kernels = [(user, server.api("POST", "/api/kernels", {})) for user, server in
                       (("alice", servers["alice"]), ("alice", servers["alice"]),
                        ("bob", servers["bob"]))]
            assert {k["name"] for _, k in kernels} == {"isolated-python"}
            channels = [await Channels(servers[user], k["id"]).open() for user, k in kernels]
            try:
                probes = [await ch.probe() for ch in channels]
                for probe in probes:
                    assert_sandboxed(probe)
                assert len({probe[0] for probe in probes}) == 3     # three hostnames
                for i, ch in enumerate(channels):
                    assert await ch.run(f"import os; open('/tmp/k{i}', 'w').close(); "
                                        "print(os.getuid(), sorted(os.listdir('/tmp')))"
                                        ) == (f"1000 ['k{i}']\n", None)
                # bob's kernel cannot reach alice's server (nor anything: only lo).
                reach = ("import socket\ntry:\n    socket.create_connection(("
                         f"{alice_ip!r}, 8888), timeout=3)\n    print('reached')\n"
                         "except OSError as exc:\n    print(exc.strerror)")
                assert await channels[2].run(reach) == ("Network is unreachable\n", None)
            finally:
                for ch in channels:
                    ch.close()
        asyncio.run(main())
        for user in users:
            hub.api("DELETE", f"/users/{user}/server")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        left = [c.name for c in client.containers.list(all=True)
                if c.name.startswith("ns-kernel-test-")]
        for name in left:
            client.api.remove_container(name, force=True)
        shutil.rmtree(top, ignore_errors=True)
    assert left == [], f"containers left behind: {left}"
