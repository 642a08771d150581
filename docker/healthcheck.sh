#!/usr/bin/env bash
# HEALTHCHECK of the scoremri image: checks whatever the container runs.
#   scoremri serve ...   ->  `scoremri serve --check` on its protocol and port (exit 0: status ok)
#   gadgetron ...        ->  its listening port accepts a connection
# Exit 0 healthy, 1 not (one line on stderr saying why). PROC_ROOT (default /proc) is for tests.
set -uo pipefail
PROC_ROOT=${PROC_ROOT:-/proc}

opt() {  # value of option $1 (or $2) in the global array argv, else $3
  local i
  for ((i = 0; i < ${#argv[@]}; i++)); do
    case ${argv[i]} in
      "$1" | "$2") echo "${argv[i + 1]:-}"; return ;;
      "$1"=* | "$2"=*) echo "${argv[i]#*=}"; return ;;
    esac
  done
  echo "$3"
}

for proc in "$PROC_ROOT"/[0-9]*; do
  [[ -r $proc/cmdline ]] || continue
  mapfile -d '' -t argv <"$proc/cmdline" 2>/dev/null || continue
  [[ ${#argv[@]} -gt 0 ]] || continue
  # the server process itself: [python] .../scoremri serve ... or python -m scoremri.gadget.cli serve ...
  # (not an init or shell whose arguments mention it)
  k=-1
  if [[ $(basename -- "${argv[0]}") == scoremri ]]; then k=0
  elif [[ $(basename -- "${argv[0]}") == python* ]]; then
    if [[ $(basename -- "${argv[1]:-}") == scoremri ]]; then k=1
    elif [[ ${argv[1]:-} == -m && ${argv[2]:-} == scoremri.gadget.cli ]]; then k=2; fi
  fi
  if (( k >= 0 )) && [[ ${argv[k + 1]:-} == serve && " ${argv[*]} " != *" --check "* ]]; then
    host=$(opt --host --host 127.0.0.1)
    [[ $host == 0.0.0.0 || $host == "::" ]] && host=127.0.0.1
    protocol=$(opt --protocol --protocol gadgetron)
    port=$(opt --port --port "")
    exec scoremri serve --check --protocol "$protocol" --host "$host" ${port:+--port "$port"} --timeout 8 >/dev/null
  fi
  if [[ $(basename -- "${argv[0]}") == gadgetron ]]; then
    port=$(opt -p --port 9002)
    if exec 3<>"/dev/tcp/127.0.0.1/$port"; then exec 3>&-; exit 0; fi
    echo "unhealthy: Gadgetron does not accept connections on port $port" >&2
    exit 1
  fi
done
echo "unhealthy: neither scoremri serve nor gadgetron is running" >&2
exit 1
