# Adds up rkvm-fuzz reports, per device: fuzz-long.sh runs it over its
# chunks' reports, and on the host it adds up long runs spread over several
# testbed boots, from their console logs:
#
#   awk -f tests/testbed/fuzz-sum.awk ~/.cache/rkvm/runs/*/console.log
#
# A report starts at its "rkvm-fuzz: seed N: I ioctls, G guest runs, F
# findings" line and names its device on the next one; a (device, seed)
# pair counts once, the first time it is seen, so overlapping logs do no
# harm. Findings are listed with the seed they came from.

{ sub(/\r$/, "") }

function flush() {
    if (dev == "" || seen[dev, seed]++) return
    seeds[dev] = seeds[dev] " " seed
    ioctls[dev] += p_ioctls; runs[dev] += p_runs; findings[dev] += p_findings
    devs[dev] = 1
}

/^rkvm-fuzz: seed [0-9]+: [0-9]+ ioctls, [0-9]+ guest runs, [0-9]+ findings/ {
    flush()
    dev = ""; seed = $3; sub(/:$/, "", seed)
    p_ioctls = $4; p_runs = $6; p_findings = $9
    counting = 0
    next
}
/^device: / { dev = $2; counting = !seen[dev, seed]; next }
!counting { next }
/^KVM_RUN: [0-9]+ calls/ { calls[dev] += $2; in_exits = 0 }
/^  exits:/ { in_exits = 1; next }
/^  errors:|^[^ ]/ { in_exits = 0 }
in_exits && /^    KVM_EXIT_/ { exits[dev, $1] += $2; names[$1] = 1 }
/^  FINDING / { found[dev] = found[dev] "  seed " seed ":" substr($0, 10) "\n" }
/^emulated time: [0-9]+ s/ { secs[dev] += $3 }

END {
    flush()
    for (d in devs) {
        printf "%s: seeds%s\n", d, seeds[d]
        printf "  ioctls %d, guest runs %d, KVM_RUN calls %d, findings %d, emulated time %d s\n",
            ioctls[d], runs[d], calls[d], findings[d], secs[d]
        for (n in names) if ((d, n) in exits) printf "    %-26s %d\n", n, exits[d, n]
        printf "%s", found[d]
    }
}
