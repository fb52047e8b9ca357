#!/usr/bin/env bash
# Makes sure a prerequisite exists, installing it with apt when possible.
# On failure prints one line: what is missing and what to do.
set -u
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "setup: $1 is missing and apt-get is not available: install $2 yourself" >&2; exit 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "setup: $1 is missing: run 'sudo apt-get install -y $2' (or make setup as root)" >&2; exit 1
  fi
  mkdir -p .cache
  if [ ! -f .cache/apt-updated ]; then
    apt-get update -qq >/dev/null && touch .cache/apt-updated
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; then
    echo "setup: 'apt-get install $2' failed; install $1 yourself, then rerun" >&2; exit 1
  fi
}
for need in "$@"; do
  case "$need" in
    python)
      "${PYTHON:-python3}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
        echo "setup: Python 3.11+ is required as python3 (or PYTHON=python3.x make ...)" >&2; exit 1; } ;;
    java)
      command -v java >/dev/null || apt_install "Java 17+" openjdk-17-jre-headless ;;
    maven)
      command -v mvn >/dev/null || apt_install "Maven" maven ;;
    redis)
      command -v redis-server >/dev/null || apt_install "redis-server" redis-server ;;
    prometheus)
      command -v prometheus >/dev/null && command -v promtool >/dev/null \
        || apt_install "prometheus (with promtool)" prometheus ;;
  esac
done
