# Shared by scripts/: where the virtualenv lives and how it is made.
# Debian's /usr/bin/python3, not pyenv's under /root (0700): the sandbox runs as another uid
# when root starts it, and an ordinary user must be able to run the same interpreter.
if [ "$(id -u)" = 0 ]; then
  VENV=${NS_KERNEL_VENV:-/opt/ns-kernel/venv}
else
  VENV=${NS_KERNEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ns-kernel/venv}
fi
BASE_PYTHON=${NS_KERNEL_BASE_PYTHON:-/usr/bin/python3}

# quietly CMD...: run CMD; its output only if it fails.
quietly() {
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || status=$?
  [ "$status" = 0 ] || cat "$log" >&2
  rm -f "$log"
  return "$status"
}

# ensure_venv [EXTRAS]: the venv, with ns_kernel and what pyproject.toml's EXTRAS (demo,
# lab, test) add, if any. The package is installed, not imported from the checkout: the sandbox (nobody,
# when root runs this) and the test user must reach it, and a clone may sit in a 0700 home.
ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$BASE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
      [ "$(id -u)" = 0 ] && quietly apt-get install -y -q python3-venv
    fi
    "$BASE_PYTHON" -m venv "$VENV"
    chmod -R a+rX "$(dirname "$VENV")"
  fi
  quietly "$VENV/bin/pip" install -q --disable-pip-version-check "$repo${1:+[$1]}"
  quietly "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$repo"
}
