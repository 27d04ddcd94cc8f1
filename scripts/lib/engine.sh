# shellcheck shell=bash
# Helpers shared by scripts/kafka, scripts/cassandra and scripts/stripe-mock,
# which all take `start|stop|status`. Each sources this file by its own path
# (before its `cd`) and then sets:
#
#   NAME             the name its messages start with
#   DIR              its state directory: pid, port, log, out, lock
#   STOP_TIMEOUT_S   seconds from SIGTERM to SIGKILL (default 20)
#   STATE_FILES      files in DIR that `stop` forgets (default pid, port)
#   FRESH_START      yes: `start` replaces a running instance instead of
#                    reusing it (default no)
#
# The Java engines (kafka, cassandra) use the rest of this file too; they set
#
#   ROOT             the ignored .cache/ folder
#   LIB, POM         their jars' folder, and the Maven pom listing the jars
#   MAIN             the JVM's main class, by which `ours` recognises it
#   READY_LINE       the line in DIR/log that says it has finished starting
#   READY_WHAT       what `start` waits for, in messages (default "serving")
#   READY_TIMEOUT_S  how long `start` waits for it
#
# and define `launch` (see await_ready). A function the script defines after
# sourcing this file replaces the one here: scripts/stripe-mock, no JVM, has
# its own `ours` and `start`.

STOP_TIMEOUT_S=20
STATE_FILES=(pid port)
FRESH_START=no
READY_WHAT=serving
# shellcheck disable=SC2034 # for the Java engines' `launch`
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }

port_in_use() {
    grep -qs -E "^ *[0-9]+: [0-9A-F]+:$(printf '%04X' "$1") " /proc/net/tcp /proc/net/tcp6
}

# A port nothing uses now, below the ephemeral range so that no outgoing
# connection takes it before the engine binds it; never one of "$@".
free_port() {
    local lo _ span port
    read -r lo _ </proc/sys/net/ipv4/ip_local_port_range
    span=$(( lo > 30000 ? lo - 20000 : 10000 ))
    while :; do
        port=$(( 20000 + RANDOM % span ))
        [[ " $* " == *" $port "* ]] && continue
        port_in_use "$port" || { echo "$port"; return 0; }
    done
}

accepts() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# "A", "A or B", "A, B or C".
or_list() {
    local out="$1"
    shift
    while (( $# > 1 )); do out+=", $1"; shift; done
    (( $# == 0 )) || out+=" or $1"
    echo "$out"
}

show_logs() {
    tail -n 40 "$DIR/log" >&2 2>/dev/null || true
    tail -n 20 "$DIR/out" >&2 2>/dev/null || true
}

lock() {
    # One start or stop at a time: tests and scripts/test may both call
    # `start`, and two instances must not share the data directory. The
    # lock is fd 9, which `launch` closes for the engine it starts.
    mkdir -p "$DIR"
    exec 9>"$DIR/lock"
    flock 9
}

# Stops the instance DIR/pid names if it is ours (never anything else that
# has its pid), then forgets it.
stop_quietly() {
    if [[ -f "$DIR/pid" ]]; then
        local pid
        pid="$(cat "$DIR/pid")"
        if ours "$pid"; then
            kill "$pid" 2>/dev/null || true
            # `ours`, not `kill -0`: an instance this very run started stays
            # a zombie until the script ends, and `ours` says no to zombies
            # (they have an empty command line and no executable).
            local deadline=$((SECONDS + STOP_TIMEOUT_S))
            while ours "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
            if ours "$pid"; then
                log "still running ${STOP_TIMEOUT_S}s after SIGTERM; killing pid $pid"
                kill -9 "$pid" 2>/dev/null || true
                while ours "$pid"; do sleep 0.1; done
            fi
        fi
        rm -f "${STATE_FILES[@]/#/$DIR/}"
    fi
}

# --- The Java engines ------------------------------------------------------

install_jars() {
    # The marker holds the pom's hash, so editing the pom (a version bump)
    # copies the jars again instead of mixing two versions in lib/.
    local stamp
    stamp="$(sha256sum "$POM" | cut -d' ' -f1)"
    if [[ -f "$LIB/.complete" && "$(cat "$LIB/.complete")" == "$stamp" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || { log "Maven (mvn) is needed to fetch ${NAME^}'s jars"; exit 1; }
    log "copying ${NAME^}'s jars from Maven Central into $LIB"
    rm -rf "$LIB"
    mkdir -p "$ROOT"
    # Maven 3 does not lock its local repository, and the other engine's
    # script may be filling the same one right now (scripts/test starts
    # Kafka and Cassandra at once).
    # Debian's Maven 3.8 prints colour codes even with -q -B; sed drops them.
    ( flock 8 && mvn -q -B -f "$POM" -Dmaven.repo.local="$ROOT/m2" \
        dependency:copy-dependencies -DoutputDirectory="$LIB" 2>&1 \
        | sed 's/\x1b\[[0-9;]*m//g' >&2 ) 8>"$ROOT/m2.lock" \
        || { log "mvn dependency:copy-dependencies failed"; exit 1; }
    echo "$stamp" >"$LIB/.complete"
}

# Whether PID is an instance this script started: java running our main
# class with a `-D...=DIR/...` property of this checkout's DIR (never some
# other instance on the machine, nor the other instance of an engine whose
# class path names this DIR's jars).
ours() {
    local cmd
    cmd="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
    [[ "$cmd" == *" $MAIN "* && "$cmd" == *"=$DIR/"* ]]
}

# The address of the running instance, if it has finished starting and
# accepts connections.
answering_addr() {
    [[ -f "$DIR/pid" && -f "$DIR/port" ]] || return 1
    local pid port
    pid="$(cat "$DIR/pid")"
    port="$(cat "$DIR/port")"
    ours "$pid" || return 1
    grep -qs "$READY_LINE" "$DIR/log" || return 1
    accepts "$port" || return 1
    echo "127.0.0.1:$port"
}

# Deletes the previous instance's data and logs, and records PORT as the
# one answering_addr checks; for `launch`, before it starts an instance.
reset_state() {
    rm -rf "$DIR/data"
    mkdir -p "$DIR/data"
    echo "$1" >"$DIR/port"
    : >"$DIR/log"
    : >"$DIR/out"
}

# Waits until PID, the instance `launch` has just started on PORTS, serves.
# Sets RETRY=yes instead if one of PORTS was taken between choosing and
# binding it (a return code would switch off `set -e` inside `launch`).
await_ready() {
    local pid="$1"
    shift
    RETRY=no
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until answering_addr >/dev/null; do
        if ! ours "$pid"; then
            if grep -qs -i 'Address already in use' "$DIR/log" "$DIR/out"; then
                log "port $(or_list "$@") was taken meanwhile; trying others"
                RETRY=yes
                return 0
            fi
            log "exited during start-up; log:"
            show_logs
            exit 1
        fi
        if (( SECONDS >= deadline )); then
            log "not $READY_WHAT after ${READY_TIMEOUT_S}s; log:"
            show_logs
            stop_quietly
            exit 1
        fi
        sleep 0.2
    done
}

start() {
    if [[ "$FRESH_START" != yes ]] && answering_addr; then
        return 0
    fi
    stop_quietly
    install_jars
    local attempt
    for attempt in 1 2 3; do
        launch
        if [[ "$RETRY" == no ]]; then
            answering_addr
            return 0
        fi
        stop_quietly
    done
    log "no free ports after $attempt attempts"
    exit 1
}

main() {
    case "${1:-}" in
        start) lock; start ;;
        stop) lock; stop_quietly ;;
        status)
            local addr
            if addr="$(answering_addr)"; then
                echo "$addr"
            else
                log "not running"
                exit 1
            fi
            ;;
        *)
            echo "usage: $0 start|stop|status" >&2
            exit 2
            ;;
    esac
}
