"""libFuzzer targets (tests/fuzz/README.md): URI parsing, configuration values, key import
parameters, encoded public keys and key reference files.

scripts/test.sh builds them with clang into $KEYX_FUZZ_DIR (default build-fuzz/ at the repo root, shared by
CI's two stages). Each target runs twice here: once over its committed seed corpus only
(regression mode: every input there, including the reproducers of fixed bugs, must pass), and
once fuzzing for a bounded time over a copy of that corpus. A crash, leak, timeout, out-of-memory,
sanitizer report or broken property (the harnesses compare keyx with the default provider or an
independent validator and abort on a difference) fails the test with the reproducer's path; a
run that executed too few inputs fails too, so a test cannot pass without fuzzing. Missing
fuzzers fail (never skip): install clang and libclang-rt-14-dev, run scripts/test.sh.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

import kxutil

FUZZ_BUILD = kxutil.REPO / os.environ.get("KEYX_FUZZ_DIR", "build-fuzz")
CORPUS = kxutil.REPO / "tests" / "fuzz" / "corpus"
# Seconds of fuzzing per target (5 targets: about 75 s per CI stage with the default).
SECONDS = int(os.environ.get("KEYX_FUZZ_SECONDS", "15"))
# Inputs each target must at least execute in that time: a tenth or less of what a loaded 2-core
# machine runs (measured per target in tests/fuzz/README.md), so only a run that did not fuzz
# fails this.
MIN_EXECS = {"uri": 10000, "config": 10000, "import": 1000, "pubkey": 500, "keyref": 60}
TARGETS = list(MIN_EXECS)


def fuzzer(target):
    b = FUZZ_BUILD / "fuzz" / f"keyx-fuzz-{target}"
    assert b.is_file(), (
        f"{b} not found: the fuzzers are built by scripts/test.sh (clang, libclang-rt-14-dev), or "
        f"CC=clang cmake -S . -B build-fuzz -DKEYX_FUZZ=ON && cmake --build build-fuzz --target keyx-fuzzers"
    )
    return b


def fuzz_env():
    # The fuzzers carry their own ASan/UBSan runtime: no preload from a sanitized keyx.so build.
    # Leak checking on (libFuzzer checks after each input that allocated more than it freed).
    return kxutil.base_env(
        LD_PRELOAD=None,
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        LSAN_OPTIONS=f"suppressions={kxutil.REPO / 'tests' / 'fuzz' / 'lsan.supp'}:print_suppressions=0",
    )


def artifacts(d):
    return sorted(p for p in Path(d).iterdir() if re.match(r"(crash|leak|timeout|oom|slow-unit)-", p.name))


def keep(target, found):
    """Copies reproducers to build-fuzz/artifacts/ (kept after the test's tmp dir goes)."""
    out = FUZZ_BUILD / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    for a in found:
        dst = out / f"{target}-{a.name}"
        shutil.copy(a, dst)
        kept.append(dst)
    return kept


def explain(target, kept, r):
    lines = [f"keyx-fuzz-{target} found a problem; reproducer(s):"]
    for k in kept:
        lines.append(f"  {k}")
        lines.append(f"  reproduce: KEYX_FUZZ_VERBOSE=1 ASAN_OPTIONS=fast_unwind_on_malloc=0 "
                     f"{fuzzer(target)} {k}")
    lines.append("then fix keyx and commit the reproducer into tests/fuzz/corpus/" + target + "/")
    return "\n".join(lines) + f"\n{r!r}"


def run_fuzzer(target, args, art, timeout):
    cmd = [fuzzer(target), "-timeout=5", "-rss_limit_mb=2048", f"-artifact_prefix={art}/", *args]
    try:
        r = kxutil.run(cmd, env=fuzz_env(), timeout=timeout)
    except AssertionError as e:  # a sanitizer report or a hang of the whole run
        pytest.fail(explain(target, keep(target, artifacts(art)), str(e)))
    found = artifacts(art)
    if r.rc != 0 or found:
        pytest.fail(explain(target, keep(target, found), r))
    return r


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_corpus_regression(target, tmp_path):
    """Every committed seed (and reproducer of a fixed bug) runs once, without fuzzing."""
    seeds = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    assert len(seeds) >= 5, f"the seed corpus of {target} is missing or too small"
    r = run_fuzzer(target, [*seeds], tmp_path, timeout=120)
    executed = len(re.findall(r"^Executed ", r.err, re.M))
    assert executed == len(seeds), f"{executed} of {len(seeds)} seeds ran:\n{r!r}"


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_bounded(target, tmp_path):
    """Fuzzes for KEYX_FUZZ_SECONDS over a copy of the seed corpus: no finding, enough inputs."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / target, corpus)
    art = tmp_path / "artifacts"
    art.mkdir()
    r = run_fuzzer(target, [f"-max_total_time={SECONDS}", "-print_final_stats=1", corpus], art,
                   timeout=SECONDS + 120)
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.err)
    assert m, f"no final stats from libFuzzer:\n{r!r}"
    execs = int(m.group(1))
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", r.err)
    print(f"keyx-fuzz-{target}: {execs} inputs in {SECONDS}s "
          f"({rate.group(1) if rate else '?'} exec/s)")
    assert execs >= MIN_EXECS[target], (
        f"keyx-fuzz-{target} executed only {execs} inputs in {SECONDS}s (< {MIN_EXECS[target]}): "
        f"it did not really fuzz\n{r!r}")
