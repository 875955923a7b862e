# Shared by scripts/: where the virtualenv lives and how it is made.
# Debian's /usr/bin/python3, not pyenv's under /root (0700): the sandbox runs as another uid
# when root starts it, and an ordinary user must be able to run the same interpreter.
if [ "$(id -u)" = 0 ]; then
  VENV=${NS_KERNEL_VENV:-/opt/ns-kernel/venv}
else
  VENV=${NS_KERNEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ns-kernel/venv}
fi
BASE_PYTHON=${NS_KERNEL_BASE_PYTHON:-/usr/bin/python3}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$BASE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
      [ "$(id -u)" = 0 ] && apt-get install -y -q python3-venv >/dev/null
    fi
    "$BASE_PYTHON" -m venv "$VENV"
    chmod -R a+rX "$(dirname "$VENV")"
  fi
  # tests/test_jupyterlab.py drives Debian's Chromium (Playwright's own download does not
  # work on these machines); a fresh machine may have no package lists yet.
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  fi
  local log
  log=$(mktemp)
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check "$repo[test]" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
