#!/usr/bin/env bash
# The key-figure parsers and compare_losses are called indirectly (by name, or in a child bash).
# shellcheck disable=SC2317
# The GPU checks, in one call on a machine with an NVIDIA GPU and its driver, using binaries
# built elsewhere and carried (that machine needs no Rust and no network):
#
#   scripts/gpu-pack.sh              # here: stripped binaries in target/gpu-pack (its last line)
#   scripts/gpu-check.sh [PACK_DIR]  # there, from the repository root, with PACK_DIR carried
#
# PACK_DIR: what gpu-pack.sh made (default target/gpu-pack); a cargo target/release folder also
# works (ringlet-train's lib test binary is then the newest deps/ringlet_train-*).
#
# Only the machine's own CUDA libraries are used: the driver's libcuda, and NVRTC, cuBLAS and NCCL
# from a CUDA install or the pip wheels of its Python environment (when python3 exists, its site
# directories are put in PYTHONPATH, where Ringlet looks for pip's nvidia/* packages;
# RINGLET_{CUDA,NVRTC,NCCL,CUBLAS}_LIB and RINGLET_CUDA_INCLUDE override the search).
#
# Steps (each under `timeout`, all under one deadline: GPU_CHECK_BUDGET_S, default 360 s, so the
# whole script ends within 8 minutes with room for a rerun in a 15-minute lease; a step the
# deadline leaves no time for is "not run: out of time"). What is newest comes first:
#   1. ringlet-gpu-check --compile-only: every kernel of kernels/ for every architecture with the
#      NVRTC found (no GPU needed); key figure: NVRTC's version and path.
#   2. ringlet-gpu-check: every reduction kernel vs ringlet-core's host reducers on fresh random
#      data (f32, f16, bf16, f64, i32, i64, u8; sum, prod, min, max, avg), bit for bit; the
#      reduction's bandwidth as a fraction of a device-to-device copy (target >= 0.85: a ratio
#      below it is flagged in the key figure, not failed).
#   3. The training binary's GPU model (cuBLAS + kernels/model.cu):
#      - ringlet-train's gpu:: unit tests (forward, gradients, both optimizers vs the CPU model;
#        optimizer kernels bit for bit; device-to-device copies, the staged and NCCL sums of
#        device buffers). A test that prints SKIPPED (no GPU, no cuBLAS) fails here.
#      - ringlet-serve's gpu tests (in the pack as ringlet-serve-tests): the MLP scoring on the
#        GPU gives the CPU's probabilities within 1e-5 for batches of 1 to 4096, a second version
#        reuses the GPU; the CNN scores on Burn's CUDA backend in a `cuda` build, else
#        `--device gpu` refuses it, saying why.
#      - 100 SGD steps on the embedded digits on the GPU and on the CPU, same seed and sample order,
#        with --metrics; the per-step losses are compared: max |gpu - cpu| / |cpu| must be at most
#        GPU_CHECK_LOSS_TOL (default 1e-3). Why 1e-3: one forward agrees within 1e-5 relative and
#        gradients within 1e-4 (the gpu:: tests' bounds), the optimizer kernels are bit-identical,
#        so the runs drift apart only by GEMM summation order compounding over 100 steps (expected
#        1e-6..1e-4 relative); a real defect (a wrong gradient, a sample dropped or counted twice,
#        a wrong learning rate) moves the loss by more than 1e-2 within a few steps.
#      - 2 ranks sharing the GPU (the gradient sum takes the TCP ring on device buffers: NCCL
#        refuses two ranks on one device); a mixed job (rank 0 on the GPU, rank 1 on the CPU,
#        --balance auto); throughput of a larger model on the GPU vs the CPU (synthetic data).
#        Key figure: samples/s from the run's final summary line.
#   4. NCCL with world size 1, all_reduce/broadcast/all_gather/reduce_scatter on device buffers,
#      every element checked. One GPU cannot host a multi-rank NCCL ring (NCCL refuses two ranks
#      on one device), so these measure NCCL's single-rank path only: busbw is 0 by definition
#      for world 1 except broadcast, and the key figure gives algbw beside it.
#   5. The staged TCP fallback for device buffers across 2 and 4 processes sharing the GPU
#      (ringlet-bench --device: chunks staged through pinned blocks, reduced by the kernels),
#      float sum, half sum, bfloat16 max, float avg, broadcast, and the host ring for comparison;
#      every element checked; key figure: peak busbw.
#
# Output: everything on stdout; with OUT set, only three files: $OUT/gpu-check.log (the full log),
# $OUT/gpu-check.json ({"steps": [{"n", "name", "command", "exit", "seconds", "status"
# (pass|fail|timeout|not-run), "key", "figures": {...}}], ...}) and $OUT/gpu-check.txt (the table
# printed at the end: step | status | seconds | key figure).
# Exit status: 0 when every step passes, else the first failing step's (124 for a step that ran
# out of time or was not run for lack of it; 1 for a step whose command succeeded but whose
# output fails the check).
set -uo pipefail

pack=${1:-target/gpu-pack}
budget=${GPU_CHECK_BUDGET_S:-360}
loss_tol=${GPU_CHECK_LOSS_TOL:-1e-3}
case "$budget" in '' | *[!0-9]*) echo "gpu-check: GPU_CHECK_BUDGET_S must be whole seconds" >&2; exit 2 ;; esac

now() { # seconds since the epoch, with a fraction
    if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/,/.}"; else date +%s.%N; fi
}
t_start=$(now)
deadline=$((SECONDS + budget))

# Step logs and metrics stay in a work directory; only gpu-check.{json,txt,log} go to $OUT (a
# device tool brings back a few files, not dozens). GPU_CHECK_KEEP_WORK=1 keeps the directory.
[ -z "${OUT:-}" ] || mkdir -p "$OUT" || exit 2
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
log=$work/gpu-check.log
: >"$log"
exec 3>&1 4>&2
exec > >(tee -a "$log") 2>&1
tee_pid=$!
echo "gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n), budget ${budget}s, pack $pack, files in $work"

# --- the machine -------------------------------------------------------------------------
gpu_line=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
cuda_line=$(timeout 20 nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | head -1)
if [ -n "$gpu_line" ]; then
    echo "GPU: $gpu_line${cuda_line:+, $cuda_line}"
else
    gpu_line="nvidia-smi: not available (no NVIDIA driver here)"
    echo "$gpu_line"
fi
if command -v python3 >/dev/null 2>&1; then
    sites=$(timeout 20 python3 -c 'import site; print(":".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
    if [ -n "$sites" ]; then
        export PYTHONPATH="$sites${PYTHONPATH:+:$PYTHONPATH}"
        echo "PYTHONPATH=$PYTHONPATH (python3's site directories, for pip's nvidia/* libraries)"
    fi
else
    echo "python3: not available (no pip-installed CUDA libraries will be found through it)"
fi
if [ -f "$pack/MANIFEST" ]; then
    sed 's/^/pack: /' "$pack/MANIFEST"
elif [ ! -x "$pack/ringrun" ]; then
    echo "gpu-check: no binaries in $pack (make them with scripts/gpu-pack.sh and carry that folder)"
fi
# A copy that lost the executable bits on the way (the pack is carried as plain files).
for f in "$pack"/ringrun "$pack"/ringlet-train "$pack"/ringlet-bench "$pack"/ringlet-gpu-check "$pack"/ringlet-train-tests "$pack"/ringlet-serve-tests; do
    if [ -f "$f" ] && [ ! -x "$f" ]; then chmod +x "$f" 2>/dev/null || echo "gpu-check: $f is not executable"; fi
done
tests_bin=$pack/ringlet-train-tests
if [ ! -x "$tests_bin" ] && [ -d "$pack/deps" ]; then
    # A cargo target folder: the newest executable ringlet-train lib test binary.
    newest=""
    for f in "$pack"/deps/ringlet_train-*; do
        case "$f" in *.d | *.rlib | *.rmeta) continue ;; esac
        if [ -f "$f" ] && [ -x "$f" ] && { [ -z "$newest" ] || [ "$f" -nt "$newest" ]; }; then newest=$f; fi
    done
    [ -n "$newest" ] && tests_bin=$newest
fi
export RINGLET_TIMEOUT=${RINGLET_TIMEOUT:-60}

# --- steps ------------------------------------------------------------------------------
S_NAME=() S_CMD=() S_RC=() S_SECS=() S_STATUS=() S_KEY=() S_FIG=()
first_fail=0

one_line() { # trims a line for the table and JSON
    local s=${1//$'\r'/}
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    [ ${#s} -gt 140 ] && s="${s:0:137}..."
    printf '%s' "$s"
}
number() { # prints $1 when it is a JSON number, else null
    if [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then printf '%s' "$1"; else printf null; fi
}
# What a failed step said: the last line naming an error (not ringrun's own "rank N exited"),
# else its last line.
why() {
    local line
    line=$(grep -v -E -e '^ringrun:' -e 'note: run with' -e '^(\[[0-9]+\] )?#' "$1" |
        grep -iE 'error|no cuda|not found|fail|panick|cannot|refus|no such|differ|wrong' | tail -1)
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$1" | tail -1)
    one_line "${line:-no output}"
}

# Key-figure parsers: read the step's log ($1), set KEY (text) and FIG (JSON members), and may
# set VERDICT=fail (a check on the output beyond the exit status).
p_nvrtc() {
    local line
    line=$(grep -m1 -E '^NVRTC [0-9]+\.[0-9]+ at ' "$1")
    [ -n "$line" ] || return
    KEY=$(one_line "$line")
    FIG="\"nvrtc_version\": \"$(sed -E 's/^NVRTC ([0-9.]+) .*/\1/' <<<"$line")\""
}
p_ratio() {
    local line ratio
    line=$(grep -m1 'ratio [0-9]' "$1")
    [ -n "$line" ] || return
    ratio=$(sed -E 's/.*ratio ([0-9.]+).*/\1/' <<<"$line")
    KEY="ratio $ratio (target >= 0.85)"
    if awk -v r="$ratio" 'BEGIN { exit !(r < 0.85) }'; then KEY="$KEY: BELOW TARGET"; fi
    FIG="\"bandwidth_ratio\": $(number "$ratio"), \"line\": \"$(json_esc "$(one_line "$line")")\""
}
p_bench() {
    # Rows of rank 0's table: size count type redop root time algbw busbw #wrong, "[0] "-prefixed.
    local peak
    peak=$(sed -E 's/^\[[0-9]+\] //' "$1" | awk '
        $1 ~ /^[0-9]+$/ && NF >= 9 && $3 ~ /^[a-z]/ {
            rows++
            if ($8 + 0 >= bus) { bus = $8 + 0; size = $1 }
            if ($7 + 0 > alg) alg = $7 + 0
        }
        END { if (rows) printf "%d %.3f %.3f %d\n", rows, bus, alg, size }')
    [ -n "$peak" ] || return
    local rows bus alg size
    read -r rows bus alg size <<<"$peak"
    KEY="peak busbw $bus GB/s at $size B (peak algbw $alg GB/s, $rows sizes)"
    FIG="\"peak_busbw_gbps\": $(number "$bus"), \"peak_algbw_gbps\": $(number "$alg"), \"peak_busbw_size_bytes\": $(number "$size"), \"sizes\": $(number "$rows")"
}
p_nccl() {
    p_bench "$1"
    [ -n "$KEY" ] && KEY="$KEY; world 1 (one GPU cannot host a multi-rank NCCL ring)"
}
p_tests() {
    local line passed
    line=$(grep -m1 '^test result:' "$1")
    [ -n "$line" ] && KEY=$(one_line "$line")
    passed=$(sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed.*/\1/p' <<<"$line")
    FIG="\"passed\": $(number "${passed:-}")"
    if grep -q 'SKIPPED' "$1"; then
        VERDICT=fail
        KEY="$(grep -c 'SKIPPED' "$1") test(s) SKIPPED, e.g. $(one_line "$(grep -m1 -o 'SKIPPED: .*' "$1" | cut -c10-)")"
    elif [ "${passed:-0}" = 0 ]; then
        VERDICT=fail
        KEY="no gpu:: test ran${line:+ ($line)}"
    fi
}
p_train() {
    local line sps acc
    line=$(grep -m1 -E 'ringlet-train: [0-9]+ steps on .*samples/s' "$1")
    [ -n "$line" ] || return
    sps=$(sed -E 's/.*; ([0-9.]+) samples\/s.*/\1/' <<<"$line")
    acc=$(sed -nE 's/.*test accuracy ([0-9.]+)%.*/\1/p' <<<"$line")
    KEY="$sps samples/s${acc:+, test accuracy $acc%}"
    local batches
    batches=$(sed -nE 's/.*local batches (\[[0-9, ]*\]).*/\1/p' <<<"$line")
    [ -n "$batches" ] && KEY="$KEY, local batches $batches"
    FIG="\"samples_per_s\": $(number "$sps"), \"test_accuracy_percent\": $(number "${acc:-}")"
}
p_compare() {
    local line rel
    line=$(grep -m1 'max relative difference' "$1")
    [ -n "$line" ] || return
    KEY=$(one_line "$line")
    rel=$(sed -E 's/.*max relative difference ([^ ]+).*/\1/' <<<"$line")
    FIG="\"max_rel_loss_diff\": $(number "$rel"), \"tolerance\": $(number "$loss_tol")"
}

json_esc() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    printf '%s' "$s" | tr -d '\000-\010\013-\037\177'
}

# step NAME LIMIT_S PARSER CMD...: runs CMD under `timeout` (the smaller of LIMIT_S and what is
# left before the deadline), its output on stdout and in $work/step-N.log, and records it.
step() {
    local name=$1 limit=$2 parser=$3
    shift 3
    local n=$((${#S_NAME[@]} + 1)) cmd left status rc secs t0
    cmd=$(printf '%q ' "$@")
    cmd=${cmd% }
    left=$((deadline - SECONDS))
    KEY="" FIG="" VERDICT=""
    if [ "$left" -lt 5 ]; then
        echo "== [$n] $name: not run: out of time"
        S_NAME+=("$name") S_CMD+=("$cmd") S_RC+=(null) S_SECS+=(0) S_STATUS+=(not-run)
        S_KEY+=("not run: out of time") S_FIG+=("")
        [ "$first_fail" -eq 0 ] && first_fail=124
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local slog=$work/step-$n.log
    echo "== [$n] $name (limit ${limit}s)"
    echo "\$ $cmd"
    t0=$(now)
    # timeout makes itself a process-group leader and signals the whole group: ranks under
    # ringrun go too. KILL 5 s after TERM for anything that ignores it.
    timeout -k 5 "$limit" "$@" </dev/null 2>&1 | tee "$slog"
    rc=${PIPESTATUS[0]}
    secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    "$parser" "$slog"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
        KEY="timed out after ${limit}s${KEY:+; $KEY}"
    elif [ "$rc" -ne 0 ]; then
        status=fail
        [ -n "$KEY" ] || KEY=$(why "$slog")
    elif [ "$VERDICT" = fail ]; then
        status=fail
    else
        status=pass
    fi
    echo "== [$n] $status, exit $rc, ${secs}s${KEY:+: $KEY}"
    S_NAME+=("$name") S_CMD+=("$cmd") S_RC+=("$rc") S_SECS+=("$secs") S_STATUS+=("$status")
    S_KEY+=("$KEY") S_FIG+=("$FIG")
    if [ "$status" != pass ] && [ "$first_fail" -eq 0 ]; then
        if [ "$rc" -ne 0 ]; then first_fail=$rc; else first_fail=1; fi
    fi
}

# Per-step losses of two --metrics files (JSON lines): max |a - b| / |b| over the steps.
compare_losses() { # GPU_METRICS CPU_METRICS TOLERANCE STEPS
    local f
    for f in "$1" "$2"; do
        [ -s "$f" ] || { echo "compare: $f is missing or empty (its training run failed)"; return 1; }
    done
    awk -v tol="$3" -v want="$4" '
        function field(line, key,   re) {
            re = "\"" key "\":-?[0-9.eE+-]+"
            if (!match(line, re)) return ""
            return substr(line, RSTART + length(key) + 3, RLENGTH - length(key) - 3)
        }
        FNR == NR { s = field($0, "step"); l = field($0, "loss"); if (s != "" && l != "") { if (!(s in g)) ng++; g[s] = l + 0 } else bad++; next }
        {
            s = field($0, "step"); l = field($0, "loss")
            if (s == "" || l == "") { bad++; next }
            l += 0
            n++
            if (!(s in g)) { missing++; next }
            d = g[s] - l; if (d < 0) d = -d
            den = l < 0 ? -l : l; if (den < 1e-12) den = 1e-12
            if (d / den > max || n == 1) { max = d / den; at = s; gl = g[s]; cl = l }
        }
        END {
            if (bad) { printf "compare: %d lines without a numeric step and loss (NaN loss?)\n", bad; exit 1 }
            if (n != want || missing || ng != want) {
                printf "compare: steps GPU %d, CPU %d, expected %d (%d CPU steps missing on the GPU)\n", ng, n, want, missing
                exit 1
            }
            printf "loss GPU vs CPU over %d steps: max relative difference %.2e at step %s (GPU %.6f, CPU %.6f), tolerance %s\n", n, max, at, gl, cl, tol
            exit !(max <= tol + 0)
        }' "$1" "$2"
}

bin=$pack

echo
echo "== 1-2: kernels"
step "kernels compile, every arch (NVRTC)" 60 p_nvrtc "$bin/ringlet-gpu-check" --compile-only
step "kernels vs CPU reference, bandwidth" 120 p_ratio "$bin/ringlet-gpu-check"

echo
echo "== 3: the training binary's GPU model"
step "GPU model vs CPU model (gpu:: unit tests)" 120 p_tests "$tests_bin" gpu:: --nocapture --test-threads=1
step "serving on the GPU vs the CPU (ringlet-serve gpu tests)" 60 p_tests "$pack/ringlet-serve-tests" gpu --nocapture --test-threads=1
steps=100
for device in gpu cpu; do
    rm -f "$work/metrics-$device.jsonl"
    step "digits, $steps SGD steps, 1 rank, --device $device" 60 p_train \
        "$bin/ringrun" -n 1 -- "$bin/ringlet-train" --device $device --steps $steps --metrics "$work/metrics-$device.jsonl"
done
{
    declare -f compare_losses
    echo 'compare_losses "$@"'
} >"$work/compare-losses.sh"
step "loss curves GPU vs CPU (tolerance $loss_tol)" 15 p_compare bash "$work/compare-losses.sh" \
    "$work/metrics-gpu.jsonl" "$work/metrics-cpu.jsonl" "$loss_tol" "$steps"
step "digits, 2 ranks sharing the GPU" 60 p_train \
    "$bin/ringrun" -n 2 -- "$bin/ringlet-train" --device gpu --steps 200
# shellcheck disable=SC2016 # $RANK, $0 and $@ are the rank shell's
step "mixed: rank 0 GPU, rank 1 CPU, --balance auto" 90 p_train "$bin/ringrun" -n 2 -- sh -c \
    'if [ "$RANK" = 0 ]; then export RINGLET_DEVICE=gpu; else export RINGLET_DEVICE=cpu; fi; exec "$0" "$@"' \
    "$bin/ringlet-train" --dataset synthetic:200000 --hidden 1024,1024 --global-batch 2048 --steps 60 --balance auto
step "throughput, --device gpu, hidden 2048,2048, batch 4096" 60 p_train \
    "$bin/ringrun" -n 1 -- "$bin/ringlet-train" --device gpu --dataset synthetic:200000 --hidden 2048,2048 --global-batch 4096 --steps 30
step "throughput, --device cpu, hidden 2048,2048, batch 4096" 90 p_train \
    "$bin/ringrun" -n 1 -- "$bin/ringlet-train" --device cpu --dataset synthetic:200000 --hidden 2048,2048 --global-batch 4096 --steps 10

echo
echo "== 4: NCCL, world size 1. One GPU cannot host a multi-rank NCCL ring (NCCL refuses two"
echo "== ranks on one device): these check NCCL's single-rank path on device buffers only."
for coll in all_reduce broadcast all_gather reduce_scatter; do
    step "NCCL world=1 $coll" 45 p_nccl \
        "$bin/ringrun" -n 1 -- "$bin/ringlet-bench" "$coll" --backend nccl -b 8 -e 256M -f 8 -n 10 -w 3
done

echo
echo "== 5: the staged TCP fallback for device buffers, processes sharing the GPU"
for n in 2 4; do
    step "TCP device fallback, $n procs, float sum" 45 p_bench \
        "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -b 1K -e 64M -f 4 -n 5 -w 2
    step "TCP device fallback, $n procs, half sum" 30 p_bench \
        "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -d half -b 1K -e 16M -f 16 -n 3 -w 1
    step "TCP device fallback, $n procs, bfloat16 max" 30 p_bench \
        "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -d bfloat16 -o max -b 1K -e 16M -f 16 -n 3 -w 1
    step "TCP device fallback, $n procs, float avg" 30 p_bench \
        "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -o avg -b 1K -e 16M -f 16 -n 3 -w 1
    step "TCP device fallback, $n procs, broadcast" 30 p_bench \
        "$bin/ringrun" -n $n -- "$bin/ringlet-bench" broadcast --device -r 1 -b 1K -e 16M -f 16 -n 3 -w 1
    step "host ring for comparison, $n procs" 45 p_bench \
        "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce -b 1K -e 64M -f 4 -n 5 -w 2
done

# --- report ------------------------------------------------------------------------------
elapsed=$(awk -v a="$t_start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
table() {
    printf '%-3s %-55s %-8s %8s  %s\n' '#' step status seconds 'key figure'
    local i
    for i in "${!S_NAME[@]}"; do
        printf '%-3s %-55s %-8s %8s  %s\n' "$((i + 1))" "${S_NAME[$i]}" "${S_STATUS[$i]}" "${S_SECS[$i]}" "${S_KEY[$i]}"
    done
    local c
    printf 'gpu-check: %s; ' "$gpu_line"
    for c in pass fail timeout not-run; do
        printf '%s %d ' "$c" "$(printf '%s\n' "${S_STATUS[@]}" | grep -cx -- "$c")"
    done
    printf '; %ss of %ss; exit %d\n' "$elapsed" "$budget" "$first_fail"
}
json() {
    local i sep=""
    printf '{\n  "script": "scripts/gpu-check.sh",\n'
    printf '  "pack": "%s",\n' "$(json_esc "$pack")"
    printf '  "gpu": "%s",\n' "$(json_esc "$gpu_line${cuda_line:+, $cuda_line}")"
    printf '  "budget_s": %s,\n  "elapsed_s": %s,\n  "exit": %d,\n' "$budget" "$elapsed" "$first_fail"
    printf '  "loss_tolerance": %s,\n  "steps": [' "$(number "$loss_tol")"
    for i in "${!S_NAME[@]}"; do
        printf '%s\n    {"n": %d, "name": "%s", "command": "%s", "exit": %s, "seconds": %s, "status": "%s", "key": "%s", "figures": {%s}}' \
            "$sep" "$((i + 1))" "$(json_esc "${S_NAME[$i]}")" "$(json_esc "${S_CMD[$i]}")" "${S_RC[$i]}" \
            "$(number "${S_SECS[$i]}")" "${S_STATUS[$i]}" "$(json_esc "${S_KEY[$i]}")" "${S_FIG[$i]}"
        sep=,
    done
    printf '\n  ]\n}\n'
}
echo
if [ -n "${OUT:-}" ]; then
    table >"$OUT/gpu-check.txt"
    json >"$OUT/gpu-check.json"
    echo "gpu-check: wrote $OUT/gpu-check.json, $OUT/gpu-check.txt and $OUT/gpu-check.log"
fi
table
# Let tee finish the log before exiting.
exec 1>&3 2>&4 3>&- 4>&-
wait "$tee_pid" 2>/dev/null
[ -z "${OUT:-}" ] || cp "$log" "$OUT/gpu-check.log"
if [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ]; then
    echo "gpu-check: step logs kept in $work"
else
    rm -rf "$work"
fi
exit "$first_fail"
