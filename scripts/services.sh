#!/usr/bin/env bash
# Local Redis and PostgreSQL for `make run`.
#
#   scripts/services.sh ensure   use the servers at REDIS_URL / DATABASE_URL if they answer;
#                                otherwise start persistent dev servers under ./var/redis and
#                                ./var/pg (on the URL's port, or the next free one if it is taken)
#   scripts/services.sh stop     stop the dev servers this script started (never anything else)
#   scripts/services.sh status   say what is running
#
# REDIS_URL / DATABASE_URL come from the environment, else from ./.env, else the local defaults.
# `ensure` prints one line per service and writes the URLs it settled on to var/services.env
# (KEY='value' lines, ready for `set -a; . var/services.env; set +a`; `make run` does that).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

var_dir="$repo_root/var"
redis_dir="$var_dir/redis"
services_env="$var_dir/services.env"

die() {
    echo "services: $*" >&2
    exit 1
}

# --- configuration -----------------------------------------------------------------------------

# config NAME DEFAULT: $NAME from the environment, else the last NAME=… line of ./.env, else DEFAULT.
config() {
    local name=$1 default=$2 value=""
    if [[ -n ${!name:-} ]]; then
        printf '%s\n' "${!name}"
        return
    fi
    if [[ -f .env ]]; then
        value=$(sed -n "s/^[[:space:]]*\(export[[:space:]]\{1,\}\)\{0,1\}$name[[:space:]]*=[[:space:]]*//p" .env | tail -n 1)
        value=${value%$'\r'}
        value=${value%\"}
        value=${value#\"}
        value=${value%\'}
        value=${value#\'}
    fi
    printf '%s\n' "${value:-$default}"
}

url_re='^([A-Za-z][A-Za-z0-9+.-]*://)([^@/]*@)?(\[[^]]*\]|[^:/?#]*)(:([0-9]*))?(.*)$'

# url_host URL / url_port URL DEFAULT_PORT / url_with_port URL PORT
url_host() {
    [[ $1 =~ $url_re ]] || die "cannot parse URL '$1'"
    local host=${BASH_REMATCH[3]}
    host=${host#[}
    host=${host%]}
    printf '%s\n' "${host:-127.0.0.1}"
}
url_port() {
    [[ $1 =~ $url_re ]] || die "cannot parse URL '$1'"
    printf '%s\n' "${BASH_REMATCH[5]:-$2}"
}
url_with_port() {
    [[ $1 =~ $url_re ]] || die "cannot parse URL '$1'"
    local host=${BASH_REMATCH[3]}
    printf '%s%s%s:%s%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${host:-127.0.0.1}" "$2" "${BASH_REMATCH[6]}"
}

sh_quote() { # single-quoted for sh and .env readers: it's -> 'it'\''s'
    printf "'%s'" "${1//\'/\'\\\'\'}"
}

is_local_host() {
    case $1 in
        127.0.0.1 | localhost | ::1 | "") return 0 ;;
        *) return 1 ;;
    esac
}

# --- probes ------------------------------------------------------------------------------------

port_in_use() { # HOST PORT: something accepts TCP connections there
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

first_free_port() { # START: the first port from START up that nothing listens on
    local port=$1
    while port_in_use 127.0.0.1 "$port"; do
        port=$((port + 1))
    done
    printf '%s\n' "$port"
}

redis_answers() { # HOST PORT: a Redis replies to PING (+PONG, or -NOAUTH when it wants a password)
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 2 line <&3 || exit 1
        [[ $line == [+-]* ]]' "$1" "$2" 2>/dev/null
}

pg_answers() { # HOST PORT: PostgreSQL accepts connections (waits while it is starting up)
    local isready="" rc tries=0
    if [[ -n ${pg_bindir:-} && -x $pg_bindir/pg_isready ]]; then
        isready=$pg_bindir/pg_isready
    elif command -v pg_isready >/dev/null 2>&1; then
        isready=pg_isready
    fi
    if [[ -z $isready ]]; then
        port_in_use "$1" "$2"
        return
    fi
    while :; do
        rc=0
        "$isready" -q -h "$1" -p "$2" -t 2 || rc=$?
        if [[ $rc -ne 1 || $tries -ge 20 ]]; then # 1: "rejecting connections" (starting up)
            return "$rc"
        fi
        tries=$((tries + 1))
        sleep 0.5
    done
}

# --- PostgreSQL binaries and the unprivileged owner --------------------------------------------

find_pg_bindir() { # a directory holding initdb and pg_ctl: PATH first, then Debian's, newest
    local dir found
    found=$(command -v initdb 2>/dev/null || true)
    if [[ -n $found && -x $(dirname "$found")/pg_ctl ]]; then
        dirname "$found"
        return
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -V -r); do
        if [[ -x $dir/initdb && -x $dir/pg_ctl ]]; then
            printf '%s\n' "$dir"
            return
        fi
    done
    return 1
}

pg_owner=""
as_owner() { # run a command as the cluster owner (initdb/postgres refuse to run as root)
    if [[ -z $pg_owner ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u "$pg_owner" -- "$@") # cd: the owner may not reach our cwd
    else
        (cd / && su -s /bin/sh "$pg_owner" -c "$(printf '%q ' "$@")")
    fi
}

setup_pg_paths() {
    pg_bindir=$(find_pg_bindir) || die "PostgreSQL server binaries not found; run scripts/install-system-deps.sh"
    pg_dir="$var_dir/pg"
    if [[ $(id -u) -eq 0 ]]; then
        if id postgres >/dev/null 2>&1; then
            pg_owner=postgres
        elif id nobody >/dev/null 2>&1; then
            pg_owner=nobody
        else
            die "running as root and neither user 'postgres' nor 'nobody' exists to own the cluster"
        fi
        # The owner must reach ./var/pg; if the checkout is in a private directory (e.g. /root),
        # keep the cluster in /var/tmp instead.
        if ! as_owner test -x "$repo_root"; then
            pg_dir="/var/tmp/gateway-dev-pg-$(printf '%s' "$repo_root" | cksum | cut -d' ' -f1)"
        fi
    fi
    pg_data="$pg_dir/data"
}

# --- ensure ------------------------------------------------------------------------------------

ensure_redis() {
    local url host port pid
    url=$(config REDIS_URL redis://127.0.0.1:6379/0)
    host=$(url_host "$url")
    port=$(url_port "$url" 6379)

    if redis_answers "$host" "$port"; then
        echo "redis: using the server at $host:$port"
        redis_url_used=$url
        return
    fi
    is_local_host "$host" || die "redis: REDIS_URL points to $host:$port, which does not answer"

    mkdir -p "$redis_dir"
    if [[ -f $redis_dir/port ]]; then
        port=$(<"$redis_dir/port")
    fi
    pid=$(cat "$redis_dir/redis.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && redis_answers 127.0.0.1 "$port"; then
        echo "redis: using the dev server at 127.0.0.1:$port (var/redis, pid $pid)"
        redis_url_used=$(url_with_port "$url" "$port")
        return
    fi
    if port_in_use 127.0.0.1 "$port"; then
        port=$(first_free_port $((port + 1)))
    fi
    command -v redis-server >/dev/null 2>&1 || die "redis: redis-server not found; run scripts/install-system-deps.sh"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$redis_dir" \
        --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" \
        --save 60 1 --appendonly no >/dev/null ||
        die "redis: redis-server failed to start; see var/redis/redis.log"
    local i
    for i in $(seq 100); do
        redis_answers 127.0.0.1 "$port" && break
        [[ $i -eq 100 ]] && die "redis: the dev server did not answer on 127.0.0.1:$port; see var/redis/redis.log"
        sleep 0.1
    done
    printf '%s\n' "$port" >"$redis_dir/port"
    echo "redis: started a dev server at 127.0.0.1:$port (data in var/redis)"
    redis_url_used=$(url_with_port "$url" "$port")
}

ensure_postgres() {
    local url host port
    url=$(config DATABASE_URL postgresql://postgres@127.0.0.1:5432/gateway)
    host=$(url_host "$url")
    port=$(url_port "$url" 5432)
    setup_pg_paths

    if pg_answers "$host" "$port"; then
        echo "postgres: using the server at $host:$port"
        database_url_used=$url
        return
    fi
    is_local_host "$host" || die "postgres: DATABASE_URL points to $host:$port, which does not answer"

    mkdir -p "$pg_dir"
    chmod 700 "$pg_dir"
    if [[ -n $pg_owner ]]; then chown "$pg_owner:" "$pg_dir"; fi
    if [[ -f $pg_dir/port ]]; then
        port=$(<"$pg_dir/port")
    fi
    if [[ ! -f $pg_data/PG_VERSION ]]; then
        as_owner "$pg_bindir/initdb" -D "$pg_data" -A trust -U postgres -E UTF8 --no-locale >"$pg_dir/initdb.log" 2>&1 ||
            die "postgres: initdb failed; see $pg_dir/initdb.log"
        local socket_dir=$pg_dir
        if [[ ${#socket_dir} -gt 80 ]]; then
            socket_dir="" # too long for a unix socket path: TCP only
        fi
        printf "\n# scripts/services.sh\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" \
            "$socket_dir" | as_owner tee -a "$pg_data/postgresql.conf" >/dev/null
    fi

    if as_owner "$pg_bindir/pg_ctl" -D "$pg_data" status >/dev/null 2>&1; then
        if pg_answers 127.0.0.1 "$port"; then
            echo "postgres: using the dev server at 127.0.0.1:$port ($pg_dir)"
            database_url_used=$(url_with_port "$url" "$port")
            return
        fi
        die "postgres: the dev cluster in $pg_dir runs but does not answer on 127.0.0.1:$port"
    fi
    if port_in_use 127.0.0.1 "$port"; then
        port=$(first_free_port $((port + 1)))
    fi
    as_owner "$pg_bindir/pg_ctl" -D "$pg_data" -l "$pg_dir/postgres.log" -w -t 60 -s \
        -o "-p $port" start ||
        die "postgres: the dev server failed to start; see $pg_dir/postgres.log"
    printf '%s\n' "$port" | as_owner tee "$pg_dir/port" >/dev/null
    pg_answers 127.0.0.1 "$port" || die "postgres: the dev server does not answer on 127.0.0.1:$port"
    echo "postgres: started a dev server at 127.0.0.1:$port (data in ${pg_dir#"$repo_root/"})"
    database_url_used=$(url_with_port "$url" "$port")
}

cmd_ensure() {
    redis_url_used=""
    database_url_used=""
    ensure_redis
    ensure_postgres
    mkdir -p "$var_dir"
    {
        echo "# written by scripts/services.sh ensure"
        echo "REDIS_URL=$(sh_quote "$redis_url_used")"
        echo "DATABASE_URL=$(sh_quote "$database_url_used")"
    } >"$services_env"
}

# --- stop / status -----------------------------------------------------------------------------

cmd_stop() {
    local pid i
    pid=$(cat "$redis_dir/redis.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid"
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && die "redis: the dev server (pid $pid) did not stop"
        rm -f "$redis_dir/redis.pid"
        echo "redis: stopped the dev server (pid $pid)"
    else
        echo "redis: no dev server running"
    fi

    setup_pg_paths
    if [[ -f $pg_data/PG_VERSION ]] && as_owner "$pg_bindir/pg_ctl" -D "$pg_data" status >/dev/null 2>&1; then
        as_owner "$pg_bindir/pg_ctl" -D "$pg_data" -m fast -w -s stop || die "postgres: pg_ctl stop failed"
        echo "postgres: stopped the dev server ($pg_dir)"
    else
        echo "postgres: no dev server running"
    fi
}

cmd_status() {
    local pid
    pid=$(cat "$redis_dir/redis.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        echo "redis: dev server running (pid $pid, port $(cat "$redis_dir/port" 2>/dev/null || echo '?'))"
    else
        echo "redis: no dev server running"
    fi
    setup_pg_paths
    if [[ -f $pg_data/PG_VERSION ]] && as_owner "$pg_bindir/pg_ctl" -D "$pg_data" status >/dev/null 2>&1; then
        echo "postgres: dev server running ($pg_dir, port $(cat "$pg_dir/port" 2>/dev/null || echo '?'))"
    else
        echo "postgres: no dev server running"
    fi
}

case ${1:-} in
    ensure) cmd_ensure ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 ensure|stop|status" >&2
        exit 2
        ;;
esac
