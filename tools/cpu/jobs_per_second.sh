#!/usr/bin/env bash
# Server throughput (issue #13): $JOBS small jobs queued at once on one `sdgen-server` (its one
# worker runs them back to back, weights warm), timed from the first submission to the last
# job's end. Prints one JSON line: jobs, seconds, jobs per second, and the load average.
#
#   SERVER=target/release/sdgen-server MODEL=testdata/tiny-sd15 JOBS=40 bash tools/cpu/jobs_per_second.sh
set -euo pipefail

SERVER=${SERVER:-target/release/sdgen-server}
MODEL=${MODEL:-testdata/tiny-sd15}
BODY=${BODY:-'{"prompt": "a lighthouse at dusk", "seed": 1, "steps": 2, "width": 64, "height": 64}'}
JOBS=${JOBS:-40}
# shellcheck source=tools/cpu/server.sh
source "$(dirname "$0")/server.sh"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
start_server "$log" --queue-size "$JOBS" --keep-jobs "$JOBS"
# One job first: the model opened and its weights warm, as a serving server's are.
id=$(curl -sf "http://$addr/v1/jobs" -d "$BODY" | python3 -c 'import sys, json; print(json.load(sys.stdin)["id"])')
until curl -sf "http://$addr/v1/jobs/$id" | python3 -c 'import sys, json; sys.exit(json.load(sys.stdin)["state"] != "done")'; do
    sleep 0.05
done
start=$(date +%s.%N)
ids=()
for _ in $(seq 1 "$JOBS"); do
    ids+=("$(curl -sf "http://$addr/v1/jobs" -d "$BODY" | python3 -c 'import sys, json; print(json.load(sys.stdin)["id"])')")
done
last=${ids[-1]}
until curl -sf "http://$addr/v1/jobs/$last" | python3 -c 'import sys, json; sys.exit(json.load(sys.stdin)["state"] in ("queued", "running"))'; do
    sleep 0.02
done
end=$(date +%s.%N)
done_jobs=$(curl -sf "http://$addr/metrics" | sed -n 's/^sdgen_jobs_total{outcome="done"} //p')
kill -TERM "$pid"
wait "$pid" || true
python3 -c "
import json, sys
jobs, s = $JOBS, $end - $start
print(json.dumps({'jobs': jobs, 'done_total': int('$done_jobs'), 'seconds': round(s, 2), 'jobs_per_s': round(jobs / s, 2), 'load': '$(cut -d' ' -f1-3 /proc/loadavg)'}))"
