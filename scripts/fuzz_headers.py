#!/usr/bin/env python
"""Long-running differential fuzzing of npmerge's safetensors header parser.

The bounded version of this runs in CI (`tests/test_safetensors_format.py::
test_differential_against_reference`, 200 examples). This script runs the same oracle
for as long as you like: every input is parsed by `npmerge.io.safetensors.parse_header`
and by the official `safetensors.deserialize`; accept/reject must agree (same error
kind, or one of the documented divergences where npmerge is stricter) and what both
accept must give the same tensors (names, dtypes, shapes, bytes).

    pip install -e '.[test]'                          # safetensors, hypothesis, ml_dtypes, pytest
    python scripts/fuzz_headers.py --seconds 3600     # hypothesis: structured hostile files
    python scripts/fuzz_headers.py --seconds 600 --seed 7 --batch 5000

    pip install atheris                               # optional, not a dependency of npmerge
    python scripts/fuzz_headers.py --atheris -max_total_time=3600 -jobs=2 corpus/
        # coverage-guided (libFuzzer flags after --atheris); the corpus dir is seeded
        # with the hostile and accepted cases of the test suite on first use

Hypothesis mode (the default, and the fallback when atheris is not importable) draws
from three generators: the test suite's structured `hostile_files()` (valid files
mutated field by field), byte-level mutations of the suite's hostile/accepted corpus,
and raw bytes behind a plausible length prefix. It stops after `--seconds`, prints the
example count, and exits 1 with the (shrunk) failing input on the first disagreement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the oracle lives with the tests

import test_safetensors_format as oracle  # noqa: E402


def corpus_seeds() -> list[bytes]:
    return [case[1] for case in oracle.BAD] + [case[1] for case in oracle.GOOD]


def run_atheris(argv: list[str]) -> None:
    import atheris

    args = [a for a in argv if not a.startswith("-")]
    if args:  # seed an empty corpus directory
        corpus = Path(args[0])
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, data in enumerate(corpus_seeds()):
                (corpus / f"seed-{i:03d}").write_bytes(data)

    def one_input(data: bytes) -> None:
        oracle.assert_agree(data)

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


def run_hypothesis(seconds: float, batch: int, seed: int | None) -> int:
    from hypothesis import HealthCheck, given, seed as fix_seed, settings
    from hypothesis import strategies as st

    seeds = corpus_seeds()

    @st.composite
    def mutated_seed(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            pos = draw(st.integers(0, len(data)))
            if op == "flip" and pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif op == "delete":
                del data[pos:pos + draw(st.integers(1, 8))]
            else:
                del data[pos:]
        return bytes(data)

    @st.composite
    def raw(draw):
        body = draw(st.binary(max_size=256))
        n = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 8), st.integers(0, 2**64 - 1)))
        return n.to_bytes(8, "little") + body

    examples = [0]

    @settings(max_examples=batch, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(oracle.hostile_files(), mutated_seed(), raw()))
    def check(data: bytes) -> None:
        examples[0] += 1
        oracle.assert_agree(data)

    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        test = fix_seed(seed + rounds)(check) if seed is not None else check
        try:
            test()
        except Exception as exc:  # noqa: BLE001 - hypothesis has printed the falsifying example
            print(f"DISAGREEMENT after {examples[0]} examples: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        rounds += 1
        print(f"{examples[0]} examples, {rounds} round(s), no disagreement", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="hypothesis mode: stop after this long")
    parser.add_argument("--batch", type=int, default=2000, help="hypothesis mode: examples per round")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis mode: reproducible rounds")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided with atheris (libFuzzer "
                                                               "arguments follow)")
    args, rest = parser.parse_known_args()
    if args.atheris:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install atheris); falling back to hypothesis", file=sys.stderr)
        else:
            run_atheris(rest)
            return 0
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_hypothesis(args.seconds, args.batch, args.seed)


if __name__ == "__main__":
    sys.exit(main())
