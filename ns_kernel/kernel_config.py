"""IPython configuration for a kernel whose connection has CurveZMQ keys: the launcher passes
it with --IPKernelApp.extra_config_file (connection.CURVE_CONFIG_ARGV), from the installed
package, read-only inside the sandbox. It runs in the kernel, before its sockets exist.

ipykernel (7.4) writes its connection file back once its sockets are bound, unless the
file says the same already, and with Curve keys it never does: it compares its keys
(bytes) with the file's (str). The launcher wrote the file with exactly the ports this
kernel binds, in the socket dir, which is read-only to the kernel by then
(sandbox.seal_socket_dir): the write would fail and end the kernel. There is nothing to
write, so this kernel skips it.
"""
from ipykernel.kernelapp import IPKernelApp

IPKernelApp.instance().write_connection_file = lambda **kwargs: None
