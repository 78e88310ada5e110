#!/usr/bin/env bash
# The checks that need a GPU, in one run: made for a short lease on a GPU machine (a bare
# checkout, the machine's own python3 with torch, nothing installed). Each part has its own time
# limit and writes its log as it goes, so a part that runs over loses nothing of the others.
#   tests     the tests with a CUDA path (they skip it without CUDA): references, metrics,
#             inputs, double-double, memory, and the CLI/report/probe tests whose sweeps have
#             cuda points;
#   overhead  benchmarks/audit_overhead.py --device cuda (issue 13's ratios, on the GPU);
#   bench     `losscheck bench` on the cuda points of the configs named in CONFIGS (default: the
#             default config, the main job), without plots; results and reports in one archive,
#             OUTDIR/bench.tgz (a lease brings few files back).
# Usage: [PARTS='tests overhead bench'] [CONFIGS='default sequence'] bash benchmarks/cuda_checks.sh [OUTDIR]
#        (OUTDIR: default $OUT, else out/cuda; limits per part in seconds: TESTS_S, OVERHEAD_S, BENCH_S;
#        TESTS: the tests, default: those with a CUDA path; WORKERS: pytest workers, default half the cores)
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-out/cuda}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
parts=" ${PARTS:-tests overhead bench} "
# Half the cores (8 on an H200 machine): test_custom's timeout tests need their worker to answer
# within 2 s, which 8 workers on 2 cores did not always give.
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) / 2 : 1 ))}

part() {  # part NAME LIMIT_S COMMAND...: run it under its limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s"
    tail -n "${TAIL:-30}" "$out/$name.log"
}

{ nvidia-smi -L; $py -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"; nproc; } 2>&1

# -p no:benchmark: a pytest-benchmark plugin, where installed, warns under xdist (an error here).
# TESTS: other tests. Left out by default, having no CUDA path: the rest of test_probe.py and
# test_torch_compile.py, whose torch_compile points compile for the CPU, from a cold inductor
# cache on a fresh machine (on an H200 machine, 70-95 s for each of test_probe's 5 slowest tests).
[[ $parts == *" tests "* ]] && part tests "${TESTS_S:-170}" $py -m pytest -n "$workers" -q -rs \
    -p no:cacheprovider -p no:benchmark --durations=10 ${TESTS:-tests/test_reference_torch.py \
    tests/test_metrics_torch.py tests/test_inputs.py tests/test_doubledouble.py tests/test_memory.py \
    tests/test_cli.py tests/test_report.py tests/test_probe.py::test_probe_on_cuda_has_the_cpu_reference \
    tests/test_precision.py tests/test_custom.py tests/test_robustness.py tests/test_training_threads.py \
    tests/test_cli_startup.py}

[[ $parts == *" overhead "* ]] && part overhead "${OVERHEAD_S:-120}" $py benchmarks/audit_overhead.py \
    --device cuda --repeat 3 --json "$out/overhead.json"

if [[ $parts == *" bench "* ]]; then
    reports=$(mktemp -d)
    for name in ${CONFIGS:-default}; do
        cfg="$reports/${name}_cuda.yaml"
        $py -c 'import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config.update(name=config["name"] + "_cuda", devices=["cuda"])
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)' "configs/$name.yaml" "$cfg"
        part "bench-$name" "${BENCH_S:-150}" $py -m losscheck bench "$cfg" --out "$reports" --gzip --no-plots \
            --no-progress
    done
    tar czf "$out/bench.tgz" -C "$reports" .
fi
exit 0
