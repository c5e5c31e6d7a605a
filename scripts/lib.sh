# Shared by scripts/dev and scripts/test (sourced, not run): make sure a Debian machine with only
# the Rust toolchain has what keygate's build and tests need. As root, missing packages are
# installed; otherwise the exact commands to run are printed and the script stops.

# Pinned versions of the offline schema validators the deploy tests use (PyPI).
KEYGATE_VALIDATORS=('kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0')

keygate_missing_packages=()
keygate_missing_validators=0

# need COMMAND DEBIAN-PACKAGE: note the package when the command is missing.
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    keygate_missing_packages+=("$2")
  fi
}

# What building keygate needs: aws-lc-sys and libz-ng-sys are built with cmake and a C compiler.
need_build_tools() {
  need cmake cmake
  need cc build-essential
  need c++ build-essential
  need pkg-config pkg-config
}

# What the test suite needs besides the build: a real redis-server (and redis-cli, for the
# cluster tests), promtool for the alert rules and dashboard queries, the prometheus server (the
# dashboard and alerts are evaluated against a running one), Node.js and npm for the official MCP
# SDK client test (tests/mcp-sdk), and the Kubernetes and Compose schema validators (Python
# packages).
need_test_tools() {
  need redis-server redis-server
  need redis-cli redis-tools
  need promtool prometheus
  need prometheus prometheus
  need node nodejs
  need npm npm
  need python3 python3
  if ! python3 -m pip --version >/dev/null 2>&1; then
    keygate_missing_packages+=(python3-pip)
  fi
  if ! python3 -c 'import kubernetes_validate, check_jsonschema, yaml' >/dev/null 2>&1; then
    keygate_missing_validators=1
  fi
}

keygate_pip_install() {
  # Debian's python3 refuses system-wide installs (PEP 668) unless told this is intended.
  python3 -m pip install -q --root-user-action=ignore "${KEYGATE_VALIDATORS[@]}" \
    || python3 -m pip install -q --root-user-action=ignore --break-system-packages \
      "${KEYGATE_VALIDATORS[@]}"
}

# Install what need_* found missing (as root), or print how and exit 1.
install_or_explain() {
  local packages=()
  if [ "${#keygate_missing_packages[@]}" -gt 0 ]; then
    # Unique, in order.
    mapfile -t packages < <(printf '%s\n' "${keygate_missing_packages[@]}" | awk '!seen[$0]++')
  fi
  if [ "${#packages[@]}" -eq 0 ] && [ "$keygate_missing_validators" -eq 0 ]; then
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "keygate: this machine lacks what the build or the tests need. Install it with:" >&2
    if [ "${#packages[@]}" -gt 0 ]; then
      echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}" >&2
    fi
    if [ "$keygate_missing_validators" -eq 1 ]; then
      local quoted
      quoted=$(printf "'%s' " "${KEYGATE_VALIDATORS[@]}")
      echo "    python3 -m pip install --user ${quoted% } (add --break-system-packages on Debian 12+)" >&2
    fi
    echo "then run this command again (or run it as root, and it installs them itself)." >&2
    exit 1
  fi
  if [ "${#packages[@]}" -gt 0 ]; then
    echo "keygate: installing ${packages[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${packages[@]}"
  fi
  if ! python3 -c 'import kubernetes_validate, check_jsonschema, yaml' >/dev/null 2>&1 \
    && [ "$keygate_missing_validators" -eq 1 ]; then
    echo "keygate: installing ${KEYGATE_VALIDATORS[*]} (pip)" >&2
    keygate_pip_install
  fi
}

# The MCP SDK client test's packages, installed from tests/mcp-sdk/package-lock.json (npm ci)
# when they are missing or the lock file changed; the test itself then runs offline.
install_mcp_sdk() {
  local dir=tests/mcp-sdk
  if ! command -v npm >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -f "$dir/node_modules/.package-lock.json" ] \
    || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "keygate: installing the MCP SDK test's packages (npm ci in $dir)" >&2
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
}
