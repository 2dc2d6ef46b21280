#!/usr/bin/env bash
# Start or stop fade workers on other machines over plain SSH, with the pool's keys.
#
#   fade-keys add worker rack1 --dir pool --out rack1.key      # on the head node, once
#   deploy/ssh/fade-workers.sh send-key rack1.key node1 node2  # once: each host gets a copy
#   FADE_ADDRESS=tcp://head:5555 deploy/ssh/fade-workers.sh start node1 node2
#   deploy/ssh/fade-workers.sh stop node1 node2                # drain, then leave
#
# Each host needs fade and the packages your functions import. Settings:
#   FADE_ADDRESS     the broker's address as the workers see it (start: required)
#   FADE_KEYS        where the worker key file is on the hosts (default .fade/worker.key,
#                    in the login directory); send-key writes it there, mode 0600
#   FADE_PROCESSES   worker processes per host (default: the host's core count)
#   FADE_WORKER      the fade-worker command on the hosts (default: fade-worker)
#   FADE_WORKER_DIR  where on the hosts the worker's log and pid file go (default: the
#                    login directory)
#   FADE_SSH         the ssh command (default: ssh), e.g. "ssh -p 2222 -i key"
# Stopping sends SIGTERM: running tasks finish, queued ones go back to the broker.
set -euo pipefail

usage="usage: $0 send-key FILE HOST... | start HOST... | stop HOST..."
action="${1:?$usage}"
shift
read -r -a ssh_cmd <<<"${FADE_SSH:-ssh}"
keys="${FADE_KEYS:-.fade/worker.key}"
dir="${FADE_WORKER_DIR:-.}"
worker="${FADE_WORKER:-fade-worker}"
processes="${FADE_PROCESSES:-\$(nproc)}"
q() { printf '%q' "$1"; }

if [ "$action" = send-key ]; then
    key_file="${1:?$usage}"
    shift
    if [ ! -r "$key_file" ]; then
        echo "$0: cannot read the key file $key_file" >&2
        exit 2
    fi
fi

for host in "$@"; do
    case "$action" in
    send-key)
        # Through ssh's standard input, so the key is on no command line; umask 077
        # makes the folder 0700 and the file 0600 before a byte of it is written.
        "${ssh_cmd[@]}" "$host" "umask 077 && mkdir -p \"\$(dirname $(q "$keys"))\" \
&& cat >$(q "$keys")" <"$key_file"
        ;;
    start)
        address="${FADE_ADDRESS:?set FADE_ADDRESS to the broker address the workers should use}"
        # The key file's path is made absolute (from the login directory) before the cd.
        "${ssh_cmd[@]}" "$host" "set -e; keys=$(q "$keys"); case \$keys in /*) ;; \
*) keys=\$PWD/\$keys ;; esac; if [ ! -r \"\$keys\" ]; then echo \"no worker key file \$keys \
on \$(hostname): fade-workers.sh send-key FILE HOST copies it there\" >&2; exit 3; fi; \
mkdir -p $(q "$dir"); cd $(q "$dir"); FADE_ADDRESS=$(q "$address") FADE_KEYS=\$keys \
nohup $worker --processes $processes >>fade-worker.log 2>&1 </dev/null & \
echo \$! >fade-worker.pid"
        ;;
    stop)
        "${ssh_cmd[@]}" "$host" "cd $(q "$dir") && kill -TERM \"\$(cat fade-worker.pid)\" \
&& rm -f fade-worker.pid"
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
    esac
    echo "$action: $host"
done
