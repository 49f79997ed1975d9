# Sourced by the server benchmarks (warm_jobs.sh, jobs_per_second.sh): starts `$SERVER --model
# $MODEL` on a free port of 127.0.0.1 with more flags "$@", its log in $1; sets `pid` and `addr`.
start_server() {
    local log=$1
    shift
    HF_HUB_OFFLINE=1 "$SERVER" --model "$MODEL" --listen 127.0.0.1:0 "$@" 2> "$log" &
    pid=$!
    addr=""
    for _ in $(seq 1 200); do
        addr=$(sed -n 's|^sdgen-server listening on http://||p' "$log" | head -1)
        [ -n "$addr" ] && return 0
        sleep 0.1
    done
    cat "$log" >&2
    kill "$pid"
    exit 1
}
