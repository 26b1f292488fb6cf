#!/usr/bin/env bash
# A throwaway cluster on this machine, on 127.0.0.1 only: PostgreSQL (Optuna's and MLflow's
# database), an MLflow tracking server on it that also serves the artifacts, and a one-node
# SLURM cluster (munged, slurmctld, slurmd). Run as root; PostgreSQL runs as the postgres user
# and munged as the munge user, as their Debian packages expect.
#
#   sweeps/cluster/cluster.sh up [postgres|mlflow|slurm ...]     start (idempotent)
#   sweeps/cluster/cluster.sh down [postgres|mlflow|slurm ...]   stop; no process left behind
#   sweeps/cluster/cluster.sh restart postgres|mlflow|slurm
#   sweeps/cluster/cluster.sh status | check-clean
#
# Everything lives in $FCE_CLUSTER_DIR (default: <repo>/.cluster): data, logs, pid files, the
# generated slurm.conf, and `env`, which a shell sources to reach the cluster:
#   FCE_OPTUNA_STORAGE  FCE_MLFLOW_DB  FCE_TRACKING_URI  FCE_PG_ADMIN  SLURM_CONF
# Ports (environment): FCE_PG_PORT=55432 FCE_MLFLOW_PORT=5050 FCE_SLURMCTLD_PORT=6817
# FCE_SLURMD_PORT=6818. Python for `mlflow server`: $FCE_PYTHON (default <repo>/.venv/bin/python).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${FCE_CLUSTER_DIR:-$REPO/.cluster}"
PY="${FCE_PYTHON:-$REPO/.venv/bin/python}"
PG_PORT="${FCE_PG_PORT:-55432}"
MLFLOW_PORT="${FCE_MLFLOW_PORT:-5050}"
SLURMCTLD_PORT="${FCE_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${FCE_SLURMD_PORT:-6818}"
HOST="127.0.0.1"
COMPONENTS=(postgres mlflow slurm)

say() { echo "cluster: $*"; }
die() { echo "cluster: error: $*" >&2; exit 1; }

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found; run sweeps/cluster/install.sh (Debian: $2)"
}

# --- processes --------------------------------------------------------------------------------
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Start a daemon in the foreground of its own session, so that `stop_group` ends it with every
# child it forked (mlflow's uvicorn workers, slurmstepd helpers).
start_daemon() {  # pidfile log command...
    local pidfile=$1 logfile=$2
    shift 2
    setsid "$@" >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

stop_group() {  # pidfile name
    local pidfile=$1 name=$2 pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not stop in 10 s; killing it"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # Children that outlived the leader (same process group).
    pkill -KILL -g "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    say "$name stopped"
}

wait_for() {  # seconds description command...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# --- PostgreSQL --------------------------------------------------------------------------------
pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [[ -n "$dir" ]] || die "PostgreSQL server not found; run sweeps/cluster/install.sh (Debian: postgresql)"
    echo "$dir"
}

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

password() {
    local file="$STATE/postgres/password"
    if [[ ! -s "$file" ]]; then
        mkdir -p "$STATE/postgres"
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$file")
    fi
    cat "$file"
}

psql_admin() { "$(pg_bin)/psql" -h "$STATE/postgres/socket" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

up_postgres() {
    local bin data="$STATE/postgres/data" sock="$STATE/postgres/socket" pw
    bin=$(pg_bin)
    id postgres >/dev/null 2>&1 || die "no postgres user; run sweeps/cluster/install.sh"
    pw=$(password)
    mkdir -p "$STATE/postgres" "$sock"
    chown postgres:postgres "$STATE/postgres" "$sock"
    chmod 700 "$sock"
    if [[ ! -f "$data/PG_VERSION" ]]; then
        say "initdb $data"
        as_postgres "$bin/initdb" -D "$data" -U postgres --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/postgres/initdb.log" 2>&1 \
            || die "initdb failed; see $STATE/postgres/initdb.log"
    fi
    if as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        say "postgres already running on $HOST:$PG_PORT"
    else
        as_postgres "$bin/pg_ctl" -D "$data" -l "$STATE/postgres/server.log" -w -t 60 \
            -o "-c listen_addresses=$HOST -p $PG_PORT -k $sock" start >/dev/null \
            || die "postgres did not start; see $STATE/postgres/server.log"
        say "postgres up on $HOST:$PG_PORT ($data)"
    fi
    # One role for the suite, one database each for Optuna and MLflow.
    if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'fce'")" ]]; then
        psql_admin -c "CREATE ROLE fce LOGIN PASSWORD '$pw'"
    fi
    for db in optuna mlflow; do
        if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
            psql_admin -c "CREATE DATABASE $db OWNER fce"
        fi
    done
}

down_postgres() {
    local data="$STATE/postgres/data"
    [[ -f "$data/postmaster.pid" ]] || return 0
    as_postgres "$(pg_bin)/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    say "postgres stopped"
}

# --- MLflow tracking server -------------------------------------------------------------------
up_mlflow() {
    local pidfile="$STATE/mlflow/server.pid"
    [[ -x "$PY" ]] || die "$PY not found; run make setup (or set FCE_PYTHON)"
    "$PY" -c "import psycopg" 2>/dev/null || die "psycopg missing in $PY; pip install 'psycopg[binary]'"
    mkdir -p "$STATE/mlflow/artifacts"
    if alive "$pidfile"; then
        say "mlflow server already running on http://$HOST:$MLFLOW_PORT"
        return 0
    fi
    # Its own connections to PostgreSQL, bounded too: 2 + 2 overflow per engine (a process has
    # two: runs and model registry). No server-side jobs (GenAI features the suite does not
    # use): they would start eight more processes.
    MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=2 MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=2 \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_daemon "$pidfile" "$STATE/mlflow/server.log" \
        "$PY" -m mlflow server --backend-store-uri "$(mlflow_db)" \
        --artifacts-destination "file://$STATE/mlflow/artifacts" \
        --host "$HOST" --port "$MLFLOW_PORT" --workers 2
    wait_for 180 "mlflow server" curl -sf "http://$HOST:$MLFLOW_PORT/health" \
        || die "mlflow server did not answer in 180 s; see $STATE/mlflow/server.log"
    say "mlflow server up on http://$HOST:$MLFLOW_PORT (artifacts in $STATE/mlflow/artifacts)"
}

down_mlflow() { stop_group "$STATE/mlflow/server.pid" "mlflow server"; }

# --- SLURM (munged, slurmctld, slurmd) --------------------------------------------------------
munge_socket() { echo "$STATE/munge/munge.socket.2"; }

up_munge() {
    local dir="$STATE/munge"
    need munged munge
    mkdir -p "$dir"
    # munged insists: its socket's directory open to all (clients), its key readable by it only.
    chown munge:munge "$dir"
    chmod 755 "$dir"
    if [[ ! -s "$dir/munge.key" ]]; then
        (umask 077 && head -c 128 /dev/urandom >"$dir/munge.key")
        chown munge:munge "$dir/munge.key"
        chmod 400 "$dir/munge.key"
    fi
    alive "$dir/munged.pid.outer" && return 0
    start_daemon "$dir/munged.pid.outer" "$dir/munged.out" \
        setpriv --reuid=munge --regid=munge --init-groups -- munged --foreground \
        --socket="$(munge_socket)" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    wait_for 20 munged munge -S "$(munge_socket)" -n \
        || die "munged did not start; see $dir/munged.log and $dir/munged.out"
}

write_slurm_conf() {
    local node cpus mem
    node=$(hostname -s)
    # The node's real shape, as slurmd sees it (a node configured bigger than it is drains).
    cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    mem=$(slurmd -C | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
    mkdir -p "$STATE/slurm/state" "$STATE/slurm/spool"
    sed -e "s|@STATE@|$STATE/slurm|g" -e "s|@MUNGE_SOCKET@|$(munge_socket)|g" \
        -e "s|@NODE@|$node|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY_MB@|$((mem * 9 / 10))|g" \
        -e "s|@SLURMCTLD_PORT@|$SLURMCTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        "$HERE/slurm.conf.in" >"$STATE/slurm/slurm.conf"
}

up_slurm() {
    need slurmctld slurmctld
    need slurmd slurmd
    need sbatch slurm-client
    up_munge
    write_slurm_conf
    export SLURM_CONF="$STATE/slurm/slurm.conf"
    if ! alive "$STATE/slurm/slurmctld.pid.outer"; then
        start_daemon "$STATE/slurm/slurmctld.pid.outer" "$STATE/slurm/slurmctld.out" \
            slurmctld -D -i -f "$SLURM_CONF"
    fi
    wait_for 60 slurmctld scontrol ping \
        || die "slurmctld did not answer; see $STATE/slurm/slurmctld.log"
    if ! alive "$STATE/slurm/slurmd.pid.outer"; then
        start_daemon "$STATE/slurm/slurmd.pid.outer" "$STATE/slurm/slurmd.out" \
            slurmd -D -f "$SLURM_CONF"
    fi
    wait_for 60 slurmd node_idle || die "node not idle; see $STATE/slurm/slurmd.log"
    say "slurm up: partition cpu, node $(hostname -s) (SLURM_CONF=$SLURM_CONF)"
}

node_idle() { sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'; }

down_slurm() {
    export SLURM_CONF="$STATE/slurm/slurm.conf"
    if alive "$STATE/slurm/slurmctld.pid.outer" && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        # Jobs end through SLURM, so that slurmd cleans up their steps.
        scancel $(squeue -h -o %i) 2>/dev/null || true
        wait_for 30 "jobs to end" test -z "$(squeue -h -o %i 2>/dev/null)" || say "jobs still listed"
    fi
    stop_group "$STATE/slurm/slurmd.pid.outer" slurmd
    stop_group "$STATE/slurm/slurmctld.pid.outer" slurmctld
    stop_group "$STATE/munge/munged.pid.outer" munged
}

# --- the env file -----------------------------------------------------------------------------
mlflow_db() { echo "postgresql+psycopg://fce:$(password)@$HOST:$PG_PORT/mlflow"; }

write_env() {
    cat >"$STATE/env" <<EOF
# Written by sweeps/cluster/cluster.sh up; source it: . $STATE/env
export FCE_CLUSTER_DIR=$STATE
export FCE_OPTUNA_STORAGE=postgresql+psycopg://fce:$(password)@$HOST:$PG_PORT/optuna
export FCE_MLFLOW_DB=$(mlflow_db)
export FCE_PG_ADMIN=postgresql://postgres@$HOST:$PG_PORT/postgres?host=$STATE/postgres/socket
export FCE_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export SLURM_CONF=$STATE/slurm/slurm.conf
EOF
}

status() {
    local bin
    bin=$(pg_bin 2>/dev/null) || true
    if [[ -n "$bin" ]] && [[ -f "$STATE/postgres/data/PG_VERSION" ]] \
        && as_postgres "$bin/pg_ctl" -D "$STATE/postgres/data" status >/dev/null 2>&1; then
        echo "postgres: up on $HOST:$PG_PORT"
    else
        echo "postgres: down"
    fi
    alive "$STATE/mlflow/server.pid" && echo "mlflow: up on http://$HOST:$MLFLOW_PORT" || echo "mlflow: down"
    alive "$STATE/munge/munged.pid.outer" && echo "munged: up" || echo "munged: down"
    alive "$STATE/slurm/slurmctld.pid.outer" && echo "slurmctld: up" || echo "slurmctld: down"
    alive "$STATE/slurm/slurmd.pid.outer" && echo "slurmd: up" || echo "slurmd: down"
}

# Processes of this cluster still running: its daemons name $STATE in their arguments; job steps
# (slurmstepd) and job scripts run under the node's slurmd only.
leftovers() { ps -eo pid=,args= | grep -F -e "$STATE" -e "slurmstepd" | grep -v -e grep -e "cluster.sh" || true; }

check_clean() {
    local left
    left=$(leftovers)
    [[ -z "$left" ]] || { echo "$left" >&2; die "processes left behind (above)"; }
    say "no process left behind"
}

main() {
    local command=${1:-}
    shift || true
    local chosen=("$@")
    [[ ${#chosen[@]} -gt 0 ]] || chosen=("${COMPONENTS[@]}")
    for c in "${chosen[@]}"; do
        [[ " ${COMPONENTS[*]} " == *" $c "* ]] || die "unknown component '$c'; choose from: ${COMPONENTS[*]}"
    done
    [[ $EUID -eq 0 ]] || [[ "$command" == status ]] || die "run as root (it starts daemons as the postgres and munge users)"
    mkdir -p "$STATE"
    case "$command" in
        up)
            for c in "${chosen[@]}"; do
                # MLflow keeps its runs in PostgreSQL.
                [[ $c == mlflow ]] && up_postgres
                "up_$c"
            done
            write_env
            say "ready: . $STATE/env"
            ;;
        down)
            # Reverse order: the tracking server before its database.
            for c in slurm mlflow postgres; do
                [[ " ${chosen[*]} " == *" $c "* ]] && "down_$c"
            done
            true
            ;;
        restart)
            for c in "${chosen[@]}"; do "down_$c"; "up_$c"; done
            ;;
        status) status ;;
        check-clean) check_clean ;;
        *) die "unknown command '$command'; choose from: up, down, restart, status, check-clean" ;;
    esac
}

main "$@"
