#!/bin/sh
# Stands in for ssh in the multi-node test: mpirun's hydra "logs in" to each host name (127.0.0.2,
# 127.0.0.3) through this script, which runs the proxy command on this machine.
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
shift   # the host name
exec sh -c "$*"
