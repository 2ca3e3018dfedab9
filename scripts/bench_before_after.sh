#!/bin/bash
# The CPU U-Net benchmark of two binaries, interleaved: BEFORE=old/orwcfm-fast [AFTER=...] [OUT=...] scripts/bench_before_after.sh
B=${BEFORE:?set BEFORE to the older binary}
A=${AFTER:-target/release/orwcfm-fast}
out=${OUT:-bench/before_after.jsonl}
: > $out
for round in 1 2; do
  for cfg in "mnist 32" "cifar10 4"; do
    set -- $cfg
    for which in before after; do
      bin=$B; [ $which = after ] && bin=$A
      line=$($bin bench unet --unet-config $1 --batch $2 --threads 2 --json 2>/dev/null | tail -1)
      echo "{\"round\": $round, \"config\": \"$1\", \"batch\": $2, \"which\": \"$which\", \"result\": $line}" >> $out
    done
  done
done
