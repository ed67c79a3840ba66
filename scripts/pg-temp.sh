#!/usr/bin/env bash
# A throw-away PostgreSQL server in a folder, for the tests (tests/conftest.py) and the benchmarks.
#
#   scripts/pg-temp.sh start DIR   # initdb + start; prints the SQLAlchemy URL of its 'postgres' database
#   scripts/pg-temp.sh stop DIR    # stop it (DIR is left for the caller to delete)
#
# The server listens only on a Unix socket inside DIR (no TCP port, so it cannot clash with another server
# or be reached from the network), trusts local connections and skips fsync (its data is thrown away).
# PostgreSQL refuses to run as root: as root the server runs as the 'postgres' user that Debian's
# 'postgresql' package creates. The binaries are found with pg_config, PG_BIN, or /usr/lib/postgresql/*/bin.
# Exit status 3 means PostgreSQL is not installed (the message says what to install); other failures
# print the server log.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$2

bindir=${PG_BIN:-}
if [ -z "$bindir" ] && command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
  bindir=$(pg_config --bindir)
fi
if [ -z "$bindir" ]; then
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
fi
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ] || [ ! -x "$bindir/pg_ctl" ]; then
  echo "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's 'postgresql' package" \
       "(apt-get install postgresql; scripts/system-deps.sh does it when run as root) or set PG_BIN" >&2
  exit 3
fi

as_owner=()
if [ "$(id -u)" = 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "running as root and there is no 'postgres' user to run the server as (PostgreSQL refuses root):" \
         "install Debian's 'postgresql' package or run as a normal user" >&2
    exit 3
  fi
  as_owner=(runuser -u postgres --)
fi

case "$action" in
start)
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  chmod 700 "$dir"
  "${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
  opts="-k $dir -c listen_addresses= -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
  if ! "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$opts" start >/dev/null; then
    cat "$dir/server.log" >&2
    exit 1
  fi
  echo "postgresql+psycopg://postgres@/postgres?host=$dir"
  ;;
stop)
  [ -d "$dir/data" ] || exit 0
  "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  ;;
*)
  usage
  ;;
esac
