#!/usr/bin/env bash
# A private Orthanc DICOMweb server on loopback for the tests (not the system service).
#
#   orthanc.sh start DIR   config, storage and log under DIR, a free port, answering loopback clients only
#                          (RemoteAccessAllowed false; Debian's Orthanc 1.10 has no bind-address option), HTTP basic
#                          authentication with a random password; prints the DICOMweb URL and writes
#                          DIR/url, DIR/credentials.json ({"username", "password"}) and DIR/pid
#   orthanc.sh stop DIR    stops the server started in DIR
#
# Needs Debian's orthanc and orthanc-dicomweb packages (apt-get install orthanc orthanc-dicomweb).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # $command, $dir, stop_pidfile

ORTHANC=${ORTHANC:-$(command -v Orthanc || true)}
PLUGIN=${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}

case "$command" in
  start)
    if [[ -z "$ORTHANC" ]]; then
      echo "orthanc.sh: Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)" >&2
      exit 1
    fi
    if [[ ! -f "$PLUGIN" ]]; then
      echo "orthanc.sh: the DICOMweb plugin $PLUGIN is missing (apt-get install orthanc-dicomweb)" >&2
      exit 1
    fi
    mkdir -p "$dir/storage"
    dir=$(cd "$dir" && pwd)
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
    cat > "$dir/orthanc.json" <<JSON
{
  "Name": "al3d-test",
  "StorageDirectory": "$dir/storage",
  "IndexDirectory": "$dir/storage",
  "Plugins": ["$PLUGIN"],
  "HttpPort": $port,
  "DicomServerEnabled": false,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": true,
  "RegisteredUsers": {"al3d": "$password"},
  "HttpTimeout": 60,
  "StableAge": 1,
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": false, "Host": "127.0.0.1:$port", "Ssl": false}
}
JSON
    printf '{"username": "al3d", "password": "%s"}\n' "$password" > "$dir/credentials.json"
    chmod 600 "$dir/credentials.json"
    "$ORTHANC" --logdir="$dir" "$dir/orthanc.json" > "$dir/stdout.log" 2>&1 &
    echo $! > "$dir/pid"
    url="http://127.0.0.1:$port/dicom-web"
    for _ in $(seq 1 100); do
      if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        echo "orthanc.sh: Orthanc exited at start; its log:" >&2
        tail -n 20 "$dir"/*.log >&2 || true
        exit 1
      fi
      if python3 - "$url" "$password" <<'PY' 2>/dev/null
import base64, sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/studies", headers={
    "Accept": "application/dicom+json",
    "Authorization": "Basic " + base64.b64encode(f"al3d:{sys.argv[2]}".encode()).decode()})
urllib.request.urlopen(request, timeout=2).read()
PY
      then
        echo "$url" > "$dir/url"
        echo "$url"
        exit 0
      fi
      sleep 0.2
    done
    echo "orthanc.sh: Orthanc did not answer on $url within 20 s" >&2
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    exit 1
    ;;
  stop)
    stop_pidfile "$dir/pid"
    ;;
  *)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
