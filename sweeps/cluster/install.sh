#!/usr/bin/env bash
# What the cluster needs, installed only where missing: Debian's PostgreSQL, SLURM and munge
# (as root, with apt-get), and psycopg 3 in the project's environment (the `cluster` extra).
#   sweeps/cluster/install.sh [python]     (default: <repo>/.venv/bin/python)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"

missing=()
ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
command -v munged >/dev/null || missing+=(munge)
command -v curl >/dev/null || missing+=(curl)
command -v pkill >/dev/null || missing+=(procps)
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || { echo "install.sh: error: need root to apt-get install ${missing[*]}" >&2; exit 1; }
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The suite runs its own daemons (own sockets, ports and state), beside any packaged ones.
# At the lock's versions (constraints.txt), less its torch line: the torch installed stays.
"$PY" -c "import psycopg" 2>/dev/null ||
    "$PY" -m pip install --quiet -c <(grep -iv '^torch==' "$REPO/constraints.txt") -e "$REPO[cluster]"
"$PY" -c "import psycopg" || { echo "install.sh: error: psycopg did not install" >&2; exit 1; }
