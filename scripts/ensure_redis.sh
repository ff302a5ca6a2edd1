#!/usr/bin/env bash
# Makes sure redis-server (the Debian package) is there for the integration tests
# of fusion's Redis online state (tests/support/redis_server.py). Tolerant: without
# root or apt the tests that need it skip and say why, and this says so once.
set -uo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure_redis: installing redis-server (apt-get)" >&2
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; then
    exit 0
  fi
fi
echo "ensure_redis: redis-server not installed (needs root and apt-get); the Redis tests will skip" >&2
exit 0
