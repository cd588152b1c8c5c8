# Sourced by the device-tool scripts (gpu_check.sh, gpu_layer.sh, gpu_all.sh, gpu_ab.sh): carried wheels (.whl/, e.g.
# bitsandbytes) into /tmp/site on PYTHONPATH, then this project in editable mode (builds lora_ops._C); the log goes to
# $OUT/install.log. No network is needed. A script started from a shell that already sourced it (LORA_OPS_INSTALLED
# set) skips the install, so one device call can run the tests and then gpu_ab.sh without paying for it twice.
export PYTHONUNBUFFERED=1
if [ -z "${LORA_OPS_INSTALLED:-}" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log"; exit 1; }
  export LORA_OPS_INSTALLED=1
fi
