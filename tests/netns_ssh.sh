#!/bin/sh
# Stands in for ssh in the two-host tests: mpirun "logs in" to a host address through this script, which
# runs the proxy command on the namespaced host that holds that address (tests/netns_enter.sh; FLOCK_NETNS
# lists "ADDRESS=NAMESPACE" pairs, separated by spaces; namespaces as `ip netns` names them). With
# --own-host-name (for Open MPI, which names its shared-memory files after the host name) the command also
# runs in a UTS namespace of its own, named after the host address.
own_name=
while [ $# -gt 0 ]; do case "$1" in --own-host-name) own_name=1; shift;; -*) shift;; *) break;; esac; done
host=$1
shift
enter=$(dirname "$0")/netns_enter.sh
for pair in $FLOCK_NETNS; do
    if [ "${pair%%=*}" = "$host" ]; then
        if [ -n "$own_name" ]; then
            exec "$enter" "${pair#*=}" unshare --uts sh -c 'hostname "$1" && exec sh -c "$2"' sh "$host" "$*"
        fi
        exec "$enter" "${pair#*=}" sh -c "$*"
    fi
done
echo "netns_ssh.sh: no namespace for host $host (FLOCK_NETNS=$FLOCK_NETNS)" >&2
exit 255
