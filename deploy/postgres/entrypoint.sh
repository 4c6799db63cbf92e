#!/bin/sh
# First start: create the cluster (superuser "postgres", reached only through the socket inside the container),
# the login role POSTGRES_USER with POSTGRES_PASSWORD and its database POSTGRES_DB; a start interrupted half-way
# begins again. SIGINT (docker stop) is PostgreSQL's fast shutdown.
set -eu
: "${POSTGRES_USER:=xraybatch}" "${POSTGRES_DB:=xraybatch}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
  echo "xraybatch-postgres: set POSTGRES_PASSWORD" >&2
  exit 2
fi
marker="$PGDATA/.xraybatch-initialised"
if [ ! -f "$marker" ]; then
  find "$PGDATA" -mindepth 1 -delete
  initdb --username=postgres --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
    -D "$PGDATA" >/dev/null
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  postgres -D "$PGDATA" -c listen_addresses='' -c unix_socket_directories=/run/postgresql &
  pid=$!
  until pg_isready -q -h /run/postgresql -U postgres; do sleep 0.2; done
  psql -q -v ON_ERROR_STOP=1 -h /run/postgresql -U postgres -d postgres \
    -v user="$POSTGRES_USER" -v db="$POSTGRES_DB" -v pw="$POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
SQL
  kill -INT "$pid"
  wait "$pid"
  touch "$marker"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/run/postgresql
