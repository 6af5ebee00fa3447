#!/usr/bin/env bash
# A Ray head on this machine, reachable on 127.0.0.1 only, with token authentication.
#
#   cluster/start-local-head.sh          start it (in the background, its own process group)
#   cluster/start-local-head.sh status   is it running? where is it?
#   cluster/start-local-head.sh stop     stop it: signals only the process group started here
#
# It never runs `ray stop`, which would end every Ray process on the machine (other users'
# clusters and test sessions included). Settings (environment):
#   RAY_PORT (6379), DASHBOARD_PORT (8265), CLIENT_PORT (10001), AGENT_PORT (52365), NUM_CPUS,
#   NUM_GPUS (detected when unset), STATE_DIR (~/.cache/dpmot-ray-head: pid file, log, and
#   Ray's temp dir).
# The token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH when set, else ~/.ray/auth_token
# (created by `ray get-auth-token --generate` if missing). Clients on this machine read the same
# file; `ray get-auth-token` prints it for clients elsewhere (e.g. behind an SSH tunnel).
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CLIENT_PORT=${CLIENT_PORT:-10001}
AGENT_PORT=${AGENT_PORT:-52365}
STATE_DIR=${STATE_DIR:-${HOME}/.cache/dpmot-ray-head}
PID_FILE=${STATE_DIR}/head.pgid
LOG_FILE=${STATE_DIR}/head.log
TEMP_DIR=${STATE_DIR}/ray   # private: `ray.init()` elsewhere never auto-joins this head

running_pgid() {
  # The recorded process group, if its leader is still our `ray start --head`.
  [[ -f ${PID_FILE} ]] || return 1
  local pgid
  pgid=$(<"${PID_FILE}")
  [[ ${pgid} =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' <"/proc/${pgid}/cmdline" 2>/dev/null | grep -q "ray start --head" || return 1
  echo "${pgid}"
}

start() {
  if pgid=$(running_pgid); then
    echo "a head is already running (process group ${pgid}); stop it first: $0 stop" >&2
    exit 1
  fi
  mkdir -p "${STATE_DIR}" "${TEMP_DIR}"
  export RAY_AUTH_MODE=token
  if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    ray get-auth-token --generate >/dev/null   # creates ~/.ray/auth_token only if missing
  fi
  # Single-node mode keeps --node-ip-address 127.0.0.1 as given (otherwise `ray start`
  # swaps it for the routable address), so the GCS, raylet and agents bind loopback only.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}
  local extra=()
  [[ -n ${NUM_CPUS:-} ]] && extra+=(--num-cpus "${NUM_CPUS}")
  [[ -n ${NUM_GPUS:-} ]] && extra+=(--num-gpus "${NUM_GPUS}")
  # setsid: a new session whose leader is the `ray start` process; $$ inside is its pid,
  # hence the group id that `stop` signals.
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "${PID_FILE}" \
    ray start --head --block --disable-usage-stats \
    --node-ip-address 127.0.0.1 --port "${RAY_PORT}" \
    --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT}" \
    --ray-client-server-port "${CLIENT_PORT}" --dashboard-agent-listen-port "${AGENT_PORT}" \
    --temp-dir "${TEMP_DIR}" \
    ${extra[@]+"${extra[@]}"} >"${LOG_FILE}" 2>&1 </dev/null &
  for _ in $(seq 120); do
    if ray job list --address "http://127.0.0.1:${DASHBOARD_PORT}" >/dev/null 2>&1; then
      pgid=$(<"${PID_FILE}")
      cat <<INFO
Ray head running (process group ${pgid}; log ${LOG_FILE})
  dashboard / job API: http://127.0.0.1:${DASHBOARD_PORT}
  GCS:                 127.0.0.1:${RAY_PORT}
Clients need RAY_AUTH_MODE=token and the token: on this machine it is read from
${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}${RAY_AUTH_TOKEN:+ (here: RAY_AUTH_TOKEN, export it too)};
elsewhere print it with \`ray get-auth-token\` and export it as RAY_AUTH_TOKEN.
  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT}
  ray job submit --working-dir . \\
    --runtime-env-json '{"excludes": [".venv", ".git", "*.npy", "bench-out"]}' \\
    -- python jobs/fit.py --targets "\$PWD/y.npy" --out "\$PWD/fit-out" \\
       --workers 2 --cpus-per-worker 0.5
Stop it with: $0 stop
INFO
      return 0
    fi
    if ! running_pgid >/dev/null; then
      echo "ray start exited; see ${LOG_FILE}:" >&2
      tail -n 20 "${LOG_FILE}" >&2
      exit 1
    fi
    sleep 1
  done
  echo "the head did not answer within 120 s; see ${LOG_FILE} (stop it with: $0 stop)" >&2
  exit 1
}

stop() {
  local pgid
  if ! pgid=$(running_pgid); then
    echo "no head started by this script is running"
    rm -f "${PID_FILE}"
    return 0
  fi
  kill -TERM -- "-${pgid}"
  for _ in $(seq 30); do
    if ! pgrep -g "${pgid}" >/dev/null; then break; fi
    sleep 1
  done
  if pgrep -g "${pgid}" >/dev/null; then
    kill -KILL -- "-${pgid}" 2>/dev/null || true
  fi
  rm -f "${PID_FILE}"
  echo "stopped the head (process group ${pgid})"
}

status() {
  if pgid=$(running_pgid); then
    echo "running: process group ${pgid}, http://127.0.0.1:${DASHBOARD_PORT}, log ${LOG_FILE}"
  else
    echo "not running"
    return 1
  fi
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
