#!/usr/bin/env bash
# Parses and validates deploy/k8s (Debian's python3-yaml under /usr/bin/python3); also
# checks that the container recipe starts from an NVIDIA CUDA base image.
#   k8s_test.sh DEPLOY_K8S_DIR
set -euo pipefail
dir="$1"
py=/usr/bin/python3
[ -x "$py" ] && "$py" -c 'import yaml' 2>/dev/null || { echo "SKIP: /usr/bin/python3 with yaml (python3-yaml) missing"; exit 77; }
"$py" "$(dirname "$0")/k8s_check.py" "$dir"
docker="$dir/../container/Dockerfile"
grep -Eq '^FROM nvidia/cuda:[0-9.]+-[a-z]+-(devel|runtime)-[a-z0-9.]+' "$docker" ||
  { echo "FAIL: $docker does not start FROM an nvidia/cuda image"; exit 1; }
echo "Dockerfile base: $(grep -m1 '^FROM' "$docker")"
