"""Who is at the other end of a TCP connection the bridge accepted: the uid that owns the
client's socket, when that socket lives on this host (in the launcher's network namespace).

A kernel's TCP ports listen on loopback, where every local user can connect. Without
CurveZMQ (jupyter_client's default, `transport_encryption = disabled`), whoever connects to
iopub reads all the kernel's output: messages are signed, not encrypted. The bridge lets
only the kernel's owner's clients in (Sandbox.tcp_clients): the Jupyter server that
started the kernel has the launcher's uid, and so has every client the user runs
(`jupyter console --existing`, an ssh tunnel's sshd).

The host kernel says whose the client's socket is: a sock_diag request (netlink, what `ss`
uses) for exactly one TCP socket, the one whose local end is the client's address and whose
remote end is ours, answers with its owner's uid: the uid that created it (fixed at
socket(), not changed by setuid or by passing the fd on). No privilege is needed, and
unlike reading /proc/net/tcp it does not walk every socket of the host. A client whose
socket is not found is another host's (or another network namespace's, a container's): as
for a plain kernel, only the key and Curve guard it.
"""
import errno
import ipaddress
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NOCOOKIE = 0xFFFFFFFF          # INET_DIAG_NOCOOKIE: match by addresses alone
NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport, dport,
# src[4], dst[4] (all four in network order), interface, cookie[2].
REQUEST = struct.Struct("=BBBBIHH16s16sIII")
# inet_diag_msg after the sockid: expires, rqueue, wqueue, uid, inode.
REPLY = struct.Struct("=BBBB48sIIIII")


def _ends(sock):
    """(family, client's (address, port), our (address, port)) of an accepted connection,
    addresses packed; an IPv4 client of an IPv6 listener (::ffff:a.b.c.d) is IPv4's."""
    family = sock.family
    (peer_host, peer_port, *_), (our_host, our_port, *_) = sock.getpeername(), sock.getsockname()
    peer_ip, our_ip = (ipaddress.ip_address(h.split("%")[0]) for h in (peer_host, our_host))
    if family == socket.AF_INET6 and peer_ip.ipv4_mapped is not None:
        family, peer_ip, our_ip = socket.AF_INET, peer_ip.ipv4_mapped, our_ip.ipv4_mapped
    return family, (peer_ip, peer_port), (our_ip, our_port)


def owner(ends):
    """The uid owning the client's end (of _ends()) if that end is a socket of this host
    (this network namespace), else None; OSError if the host kernel cannot be asked."""
    family, (client_ip, client_port), (our_ip, our_port) = ends
    request = REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,
                           socket.htons(client_port), socket.htons(our_port), client_ip.packed, our_ip.packed, 0, NOCOOKIE, NOCOOKIE)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        nl.sendto(NLMSGHDR.pack(NLMSGHDR.size + REQUEST.size, SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST, 1, 0) + request, (0, 0))
        reply = nl.recv(4096)
    _length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(reply)
    if kind == NLMSG_ERROR:
        err = -struct.unpack_from("=i", reply, NLMSGHDR.size)[0]
        if err == errno.ENOENT:
            return None
        raise OSError(err, os.strerror(err))
    return REPLY.unpack_from(reply, NLMSGHDR.size)[8]


def refused(sock, allowed):
    """Why `sock` must be refused (its client is local and its owner not one of the uids
    `allowed`), or None to let it in. A loopback client not found (closed already), or
    any client when the host kernel cannot be asked, is refused: who it is cannot be told."""
    try:
        ends = _ends(sock)
    except OSError:
        return "a client gone already"
    try:
        uid = owner(ends)
    except OSError as exc:
        return f"a client of unknown owner (sock_diag: {exc.strerror})"
    if uid is None:
        return "a client gone already" if ends[1][0].is_loopback else None
    return None if uid in allowed else f"uid {uid}"
