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
  # Only what changed: a reinstall costs ~12 s, and a changed file (its inode, its time)
  # retires the warm template, whose next kernel then starts cold. The package alone when
  # its files differ from those installed; its dependencies too when pyproject.toml
  # differs from the one the stamp in the venv names, or an extra asked for now did not go
  # in since.
  local stamp="$VENV/ns-kernel-install.stamp" project had="" extra missing=
  project=$(sha256sum < "$repo/pyproject.toml" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$project" ]; then
    had=$(tail -n +2 "$stamp")
    for extra in ${1//,/ }; do
      grep -qx "$extra" <<<"$had" || missing=1
    done
    if [ -z "$missing" ]; then
      "$VENV/bin/python" -P -c 'import importlib.util as u
print(u.find_spec("ns_kernel").submodule_search_locations[0])' 2>/dev/null |
        { read -r installed && diff -rq -x __pycache__ "$repo/ns_kernel" "$installed" >/dev/null; } ||
        quietly "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$repo"
      return
    fi
  fi
  quietly "$VENV/bin/pip" install -q --disable-pip-version-check "$repo${1:+[$1]}"
  quietly "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$repo"
  { echo "$project"; { echo "$had"; tr ',' '\n' <<<"${1:-}"; } | grep -v '^$' | sort -u; } > "$stamp"
}

# ensure_kernelspec: Isolated Python's kernelspec in the venv (--sys-prefix), unless one is
# there: whatever options a person gave it since (the no-network hint's `--network proxy`)
# stay; `$VENV/bin/ns-kernel install --sys-prefix` writes the default again.
ensure_kernelspec() {
  [ -f "$VENV/share/jupyter/kernels/isolated-python/kernel.json" ] ||
    quietly "$VENV/bin/ns-kernel" install --sys-prefix
}
