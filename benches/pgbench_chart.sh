#!/usr/bin/env bash
# Renders the CSV written by benches/pgbench.sh as a PNG with gnuplot: TPS of
# Offshoot and PgBouncer relative to direct PostgreSQL per workload (top) and
# the proxies' CPU time per transaction (bottom).
#
#   bash benches/pgbench_chart.sh CSV PNG [SUBTITLE]
#
# Installs gnuplot-nox with apt-get when gnuplot is missing (as root). Exits 2,
# having said why, when gnuplot is not available, so that callers may go on
# without the chart.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$BENCH_DIR/lib.sh"

(($# >= 2)) || die "usage: bash benches/pgbench_chart.sh CSV PNG [SUBTITLE]"
CSV=$1
PNG=$2
SUBTITLE=${3:-}
SUBTITLE=${SUBTITLE//[\\\"]/}
[[ -s $CSV ]] || die "$CSV does not exist or is empty"

if ! apt_install_missing gnuplot gnuplot-nox; then
    log "gnuplot is not available; no chart drawn ($PNG)"
    exit 2
fi

TMP=$(mktemp -d -t offshoot-chart.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

# CSV -> whitespace-separated rows gnuplot reads: index, offshoot and pgbouncer
# TPS ratios to direct, their CPU µs/txn ("?" when missing). The titles become
# the x tic labels. The CSV's second field (title) is quoted and may hold commas.
awk -v dat="$TMP/chart.dat" -v tics="$TMP/tics.gp" '
    function parse(line,    i, c, q, f, n) {
        n = 0; f = ""; q = 0
        for (i = 1; i <= length(line); i++) {
            c = substr(line, i, 1)
            if (q) {
                if (c == "\"" && substr(line, i + 1, 1) == "\"") { f = f c; i++ }
                else if (c == "\"") q = 0
                else f = f c
            } else if (c == "\"") q = 1
            else if (c == ",") { F[++n] = f; f = "" }
            else f = f c
        }
        F[++n] = f
        return n
    }
    function num(v) { return v == "" ? "?" : v }
    function ratio(a, b) { return (a == "" || b == "" || b + 0 == 0) ? "?" : sprintf("%.4f", a / b) }
    NR == 1 { n = parse($0); for (i = 1; i <= n; i++) col[F[i]] = i; next }
    {
        sub(/\r$/, "")
        parse($0)
        d = F[col["direct_tps"]]
        printf "%d %s %s %s %s\n", k, ratio(F[col["offshoot_tps"]], d), ratio(F[col["pgbouncer_tps"]], d),
            num(F[col["offshoot_cpu_us_per_txn"]]), num(F[col["pgbouncer_cpu_us_per_txn"]]) > dat
        label = F[col["title"]]
        gsub(/"/, "", label)
        gsub(/, /, "\\n", label)
        tic = tic (k ? ", " : "") sprintf("\"%s\" %d", label, k)
        k++
    }
    END {
        if (!k) exit 1
        printf "set xtics (%s)\nset xrange [-0.6:%f]\n", tic, k - 0.4 > tics
    }' "$CSV" || die "$CSV has no data rows"

# Ratios above CAP are drawn up to CAP and labelled with their real value.
CAP=$(awk '$2 != "?" { print $2 } $3 != "?" { print $3 }' "$TMP/chart.dat" | sort -g | tail -n 1 |
    awk '{ c = $1 * 1.15; if (c < 1.25) c = 1.25; if (c > 2.0) c = 2.0; printf "%.2f", c }')
CUT=$(awk -v cap="$CAP" '($2 != "?" && $2 > cap) || ($3 != "?" && $3 > cap) { c = 1 } END { print c + 0 }' "$TMP/chart.dat")
CPU_MAX=$(awk '$4 != "?" { print $4 } $5 != "?" { print $5 }' "$TMP/chart.dat" | sort -g | tail -n 1)
CPU_MAX=${CPU_MAX:-1}

TERMINAL="pngcairo size 1200,1000 enhanced font 'DejaVu Sans,11'"
gnuplot -e 'set terminal' 2>&1 | grep pngcairo >/dev/null || TERMINAL="png size 1200,1000"

cat >"$TMP/chart.gp" <<EOF
set encoding utf8
set terminal $TERMINAL
set output "$PNG"
set datafile missing "?"
set style fill solid 0.85 border -1
set boxwidth 0.36
set grid ytics lc rgb "#dddddd"
set key top left
set tics nomirror
load "$TMP/tics.gp"
set xtics font ",9"
set bmargin 5
cap = $CAP
cut = $CUT
clip(v) = v > cap ? cap : v
over(v) = v > cap ? sprintf("%.2f× ↑", v) : sprintf("%.2f×", v)
set multiplot layout 2,1 title "pgbench: Offshoot and PgBouncer compared with direct PostgreSQL (medians)\n$SUBTITLE" noenhanced
set title sprintf("Throughput relative to direct (1.0 = direct; higher is better)%s", \
    cut ? sprintf("; bars above %.2f× are cut, ↑ marks them", cap) : "")
set ylabel "TPS ÷ direct TPS"
set yrange [0:cap * 1.08]
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 1.5 lc rgb "#555555" back
plot "$TMP/chart.dat" using (\$1 - 0.19):(clip(\$2)) with boxes lc rgb "#1f77b4" title "Offshoot", \
     "" using (\$1 + 0.19):(clip(\$3)) with boxes lc rgb "#ff7f0e" title "PgBouncer (session mode)", \
     "" using (\$1 - 0.19):(clip(\$2)):(over(\$2)) with labels offset 0,0.7 font ",9" notitle, \
     "" using (\$1 + 0.19):(clip(\$3)):(over(\$3)) with labels offset 0,0.7 font ",9" notitle
unset arrow 1
set title "Proxy CPU time per transaction (user + system; lower is better)"
set ylabel "CPU µs / transaction"
set yrange [0:$CPU_MAX * 1.18]
plot "$TMP/chart.dat" using (\$1 - 0.19):4 with boxes lc rgb "#1f77b4" title "Offshoot", \
     "" using (\$1 + 0.19):5 with boxes lc rgb "#ff7f0e" title "PgBouncer (session mode)", \
     "" using (\$1 - 0.19):4:(sprintf("%.1f", \$4)) with labels offset 0,0.7 font ",9" notitle, \
     "" using (\$1 + 0.19):5:(sprintf("%.1f", \$5)) with labels offset 0,0.7 font ",9" notitle
unset multiplot
EOF
gnuplot "$TMP/chart.gp" 2>"$TMP/gnuplot.err" || {
    cat "$TMP/gnuplot.err" >&2
    die "gnuplot failed"
}
# gnuplot warns rather than fails on some problems; show them.
[[ -s $TMP/gnuplot.err ]] && cat "$TMP/gnuplot.err" >&2
log "Chart written to $PNG"
