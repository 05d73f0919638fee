#!/usr/bin/env bash
# Render the gateway's nginx templates as the official nginx image does at container start:
# each TEMPLATE_DIR/**/*.template becomes OUTPUT_DIR/**/<name without .template>, with envsubst
# replacing only the environment variables that are set and whose names match NGINX_ENVSUBST_FILTER
# (a regular expression; compose sets it to ^GATEWAY_). Any other $name is left for nginx.
#
#   scripts/render-gateway-conf.sh [TEMPLATE_DIR] OUTPUT_DIR
#   TEMPLATE_DIR defaults to deploy/gateway/templates.
set -euo pipefail

if [[ $# -eq 1 ]]; then
  template_dir="$(dirname "$0")/../deploy/gateway/templates"
  output_dir=$1
elif [[ $# -eq 2 ]]; then
  template_dir=$1
  output_dir=$2
else
  echo "usage: $0 [TEMPLATE_DIR] OUTPUT_DIR" >&2
  exit 2
fi
suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
filter=${NGINX_ENVSUBST_FILTER:-}

# envsubst's SHELL-FORMAT argument: "${A} ${B} ..." for every set variable the filter lets through.
shell_format=$(awk -v filter="$filter" 'END { for (name in ENVIRON) if (name ~ filter) printf "${%s} ", name }' </dev/null)

find "$template_dir" -follow -type f -name "*$suffix" | while read -r template; do
  relative=${template#"$template_dir"/}
  output="$output_dir/${relative%"$suffix"}"
  mkdir -p "$(dirname "$output")"
  envsubst "$shell_format" <"$template" >"$output"
done
