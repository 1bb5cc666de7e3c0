#!/usr/bin/env bash
# MLflow's own PostgreSQL role: a login that owns MLflow's database and nothing more (no superuser,
# no CREATEDB, no CREATEROLE). The image's POSTGRES_USER stays the only superuser, with its own
# password (secrets/postgres_password), which MLflow never gets.
#
# compose.yaml mounts this into /docker-entrypoint-initdb.d, so the postgres image runs it once,
# when it initialises an empty volume, as the postgres user against its temporary server (git keeps
# the file executable, so the image runs it rather than sourcing it). tests/test_deploy_stack.py runs
# the same script against its throwaway PostgreSQL. Reads: POSTGRES_USER, POSTGRES_DB (the database
# the image created), MLFLOW_DB_USER, MLFLOW_DB_PASSWORD_FILE; psql finds the server the usual way.
set -euo pipefail

die() {
    printf 'postgres-init: error: %s\n' "$*" >&2
    exit 1
}

role=${MLFLOW_DB_USER:-mlflow}
db=${POSTGRES_DB:-}
superuser=${POSTGRES_USER:-postgres}
file=${MLFLOW_DB_PASSWORD_FILE:-}
[ -n "$db" ] || die "POSTGRES_DB is not set: the database MLflow's role will own"
[ -n "$file" ] || die "MLFLOW_DB_PASSWORD_FILE is not set: the file holding the password of MLflow's role"
if [ ! -f "$file" ] || [ ! -r "$file" ]; then
    die "MLFLOW_DB_PASSWORD_FILE=$file is not a file readable by uid $(id -u)"
fi
password=$(<"$file")
[ "${#password}" -ge 16 ] || die "the password in $file is too short (${#password} characters, at least 16)"
case $role$db in
    *[!a-z0-9_]*) die "MLFLOW_DB_USER and POSTGRES_DB may hold lowercase letters, digits and _ only" ;;
esac
[ "$role" != "$superuser" ] || die "MLFLOW_DB_USER must differ from POSTGRES_USER: MLflow gets no superuser"

echo "postgres-init: role $role (no superuser) owns database $db" >&2
# The SQL goes to psql's standard input, so the password is on no command line; a ' is written ''.
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$superuser" --dbname "$db" <<EOF
CREATE ROLE $role LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD '${password//\'/\'\'}';
ALTER DATABASE $db OWNER TO $role;
REVOKE ALL ON DATABASE $db FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE $db TO $role;
EOF
