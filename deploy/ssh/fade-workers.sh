#!/usr/bin/env bash
# Start or stop fade workers on other machines over plain SSH.
#
#   FADE_ADDRESS=tcp://head:5555 deploy/ssh/fade-workers.sh start node1 node2 node3
#   deploy/ssh/fade-workers.sh stop node1 node2 node3
#
# Each host needs fade and the packages your functions import. Settings:
#   FADE_ADDRESS    the broker's address as the workers see it (start: required)
#   FADE_PROCESSES  worker processes per host (default: the host's core count)
#   FADE_WORKER     the fade-worker command on the hosts (default: fade-worker)
#   FADE_SSH        the ssh command (default: ssh), e.g. "ssh -p 2222 -i key"
# A worker's log and pid file are in the login directory on its host. Stopping
# sends SIGTERM: running tasks finish, queued ones go back to the broker.
set -euo pipefail

usage="usage: $0 start|stop HOST..."
action="${1:?$usage}"
shift
read -r -a ssh_cmd <<<"${FADE_SSH:-ssh}"
worker="${FADE_WORKER:-fade-worker}"
processes="${FADE_PROCESSES:-\$(nproc)}"

for host in "$@"; do
    case "$action" in
    start)
        address="${FADE_ADDRESS:?set FADE_ADDRESS to the broker address the workers should use}"
        "${ssh_cmd[@]}" "$host" "FADE_ADDRESS=$(printf '%q' "$address") nohup $worker \
--processes $processes >>fade-worker.log 2>&1 </dev/null & echo \$! >fade-worker.pid"
        ;;
    stop)
        "${ssh_cmd[@]}" "$host" 'kill -TERM "$(cat fade-worker.pid)" && rm -f fade-worker.pid'
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
    esac
    echo "$action: $host"
done
