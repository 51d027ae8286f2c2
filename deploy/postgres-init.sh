#!/bin/sh
# Run once by the postgres image, on an empty data directory
# (/docker-entrypoint-initdb.d): the application role owns the `tareas`
# database and nothing else; POSTGRES_USER stays the operators' superuser.
# An existing volume keeps its old setup: docs/security.md says how to add
# the role by hand.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v app_user="$TAREAS_DB_USER" -v app_password="$TAREAS_DB_PASSWORD" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
CREATE DATABASE tareas OWNER :"app_user";
REVOKE ALL ON DATABASE tareas FROM PUBLIC;
SQL
