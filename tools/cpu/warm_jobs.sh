#!/usr/bin/env bash
# Job latency through the server, cold against warm (issue #13, point 1): the same job sent twice
# back to back to `sdgen-server` as it starts (weights kept warm: the second job reads none), and
# to `sdgen-server --no-keep-warm` (every job reads every weight). Prints one JSON line per job:
# the server mode, the job's wall time (`elapsed_ms`, queue to done), its stage timings and how
# each stage came by its weights, and the load average when it ended.
#
#   SERVER=target/release/sdgen-server MODEL=testdata/tiny-sd15 bash tools/cpu/warm_jobs.sh
#   SERVER=... MODEL=/tmp/sd15 BODY='{"prompt": "a lighthouse", "seed": 1, "steps": 2, "width": 64, "height": 64}' \
#     bash tools/cpu/warm_jobs.sh
#
# A real-size SD 1.5 with random weights (4.3 GB in f32, no download):
#   target/release/sdgen-bench --family sd15 --model-dir /tmp/sd15 --write-only
set -euo pipefail

SERVER=${SERVER:-target/release/sdgen-server}
MODEL=${MODEL:-testdata/tiny-sd15}
BODY=${BODY:-'{"prompt": "a lighthouse at dusk", "seed": 1, "steps": 4, "width": 64, "height": 64}'}
JOBS=${JOBS:-2}
# shellcheck source=tools/cpu/server.sh
source "$(dirname "$0")/server.sh"

# Runs $JOBS jobs on a server started with "$@"; prints a line per job.
run() {
    local mode=$1
    shift
    local log
    log=$(mktemp)
    local pid addr
    start_server "$log" "$@"
    for job in $(seq 1 "$JOBS"); do
        local id
        id=$(curl -sf "http://$addr/v1/jobs" -d "$BODY" | python3 -c 'import sys, json; print(json.load(sys.stdin)["id"])')
        while true; do
            local state
            state=$(curl -sf "http://$addr/v1/jobs/$id")
            if echo "$state" | python3 -c 'import sys, json; sys.exit(json.load(sys.stdin)["state"] in ("queued", "running"))'; then
                break
            fi
            sleep 0.05
        done
        echo "$state" | MODE=$mode JOB=$job LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" python3 -c '
import json, os, sys
j = json.load(sys.stdin)
extra = j["images"][0]["metadata"]["extra"] if j["images"] else {}
meta = j["images"][0]["metadata"] if j["images"] else {}
print(json.dumps({
    "mode": os.environ["MODE"], "job": int(os.environ["JOB"]), "state": j["state"],
    "elapsed_ms": j["elapsed_ms"], "timings_ms": {k: round(v) for k, v in meta.get("timings_ms", {}).items()},
    "weights": extra.get("weights"), "load": os.environ["LOAD"],
}))'
    done
    curl -sf "http://$addr/metrics" | grep -E '^sdgen_(weight|warm)' >&2 || true
    kill -TERM "$pid"
    wait "$pid" || true
    rm -f "$log"
}

run warm
run cold --no-keep-warm
