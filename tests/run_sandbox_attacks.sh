#!/usr/bin/env bash
# Runs the hostile-program tests inside their own PID namespace and pids cgroup, so that even a
# broken sandbox cannot exhaust the machine's processes, and nothing outlives the run (the
# namespace's init is pytest; when it exits the kernel kills everything left in it).
# Needs root for the cgroup; without one (or without `unshare`) it says so and runs plain pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PIDS_MAX="${PIDS_MAX:-1024}"
tests=(python -m pytest tests/test_sandbox_attacks.py -q "$@")

cg=""
if [ "$(id -u)" = 0 ]; then
  if [ -e /sys/fs/cgroup/pids/cgroup.procs ]; then  # cgroup v1
    cg="/sys/fs/cgroup/pids$(awk -F: '$2 == "pids" {print $3}' /proc/self/cgroup | sed 's:/$::')/rstar-attack-tests-$$"
  elif [ -e /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v2
    cg="/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup | sed 's:/$::')/rstar-attack-tests-$$"
  fi
fi
if [ -n "$cg" ] && mkdir "$cg" 2>/dev/null && echo "$PIDS_MAX" > "$cg/pids.max" 2>/dev/null; then
  trap 'rmdir "$cg" 2>/dev/null || true' EXIT
else
  echo "run_sandbox_attacks: no writable pids cgroup; running without a process cap" >&2
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
  cg=""
fi

run() {
  if [ -n "$cg" ]; then echo "$BASHPID" > "$cg/cgroup.procs"; fi
  if unshare --pid --fork --kill-child --mount-proc true 2>/dev/null; then
    exec unshare --pid --fork --kill-child --mount-proc "${tests[@]}"
  fi
  echo "run_sandbox_attacks: cannot create a PID namespace; running in the host's" >&2
  exec "${tests[@]}"
}
( run )
