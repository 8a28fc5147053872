"""OpenMP's spin after each parallel op, the same whichever of torch and archlab loads first.

After each parallel op, torch's OpenMP (GNU libgomp) workers spin for GOMP's default 300,000
iterations (milliseconds with PAUSE on current x86) before they sleep. The fused numba kernels
run on threads of their own right after such ops, so on 2 cores the spinning worker took half
a core from them: Mamba's training step at T=128 and 2 threads ran at 3.07x dense with the
default and 2.20x with 10,000 spins, while dense itself was unchanged (45.0 vs 44.0 us/token;
benchmarks/bench_layers.py, issue #12).

libgomp reads ``GOMP_SPINCOUNT`` once, when it loads with torch. So:

- archlab imported first: ``GOMP_SPINCOUNT=10000`` goes into the environment (``before_torch``);
- torch imported first: too late for the variable, so ``after_torch`` sets libgomp's own
  ``gomp_spin_count_var`` in place. It is hidden (not exported), so it is found by value: in
  libgomp's writable data the one 8-byte word holding the default 300,000 with the throttled
  count 100 (``gomp_throttled_spin_count_var``) 16 bytes after it, the layout of GCC 8-14's
  ``env.c``. Anything else found (no match, several, a value other than the default) leaves
  libgomp alone; ``spin_count`` reads the live value back for tests and benchmarks. libgomp
  reads the variable at every wait, so the new count holds from the next op on.

A value the user set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) is kept in both orders, and
nothing is done where torch's OpenMP is not libgomp (macOS, Windows, an LLVM/Intel runtime).
"""

from __future__ import annotations

import ctypes
import os
import struct

SPINCOUNT = 10000
DEFAULT_SPINCOUNT = 300000  # libgomp's default when neither variable is set
THROTTLED_DEFAULT = 100  # gomp_throttled_spin_count_var: min(100, spin count)
_THROTTLED_OFFSET = 16  # bytes from gomp_spin_count_var to gomp_throttled_spin_count_var
USER_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def user_chose() -> bool:
    return any(v in os.environ for v in USER_VARIABLES)


def before_torch() -> None:
    """torch (and so libgomp) not loaded yet: the environment variable takes effect."""
    if not user_chose():
        os.environ["GOMP_SPINCOUNT"] = str(SPINCOUNT)


def _libgomp_data() -> list[tuple[int, int]]:
    """(address, length) of the writable mappings of libgomp files in this process."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and "w" in parts[1] and os.path.basename(parts[5]).startswith("libgomp"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi - lo))
    return out


def spin_count_address(value: int) -> int | None:
    """Address of libgomp's spin count if exactly one word matches ``value`` (and its throttled
    neighbour min(100, value)); None where there is no libgomp or the match is not unique."""
    throttled = min(THROTTLED_DEFAULT, value)
    found = []
    for addr, length in _libgomp_data():
        buf = ctypes.string_at(addr, length)
        for off in range(0, length - _THROTTLED_OFFSET - 7, 8):
            if struct.unpack_from("<Q", buf, off)[0] == value and (
                struct.unpack_from("<Q", buf, off + _THROTTLED_OFFSET)[0] == throttled
            ):
                found.append(addr + off)
    return found[0] if len(found) == 1 else None


def spin_count(expected: int) -> int | None:
    """The live spin count when libgomp's variable holds ``expected`` (a check that it does)."""
    addr = spin_count_address(expected)
    return None if addr is None else ctypes.c_uint64.from_address(addr).value


def after_torch() -> bool:
    """torch already loaded libgomp: set its spin count in place. True when it was set."""
    if user_chose():
        return False
    addr = spin_count_address(DEFAULT_SPINCOUNT)
    if addr is None:
        return False
    ctypes.c_uint64.from_address(addr).value = SPINCOUNT
    os.environ["GOMP_SPINCOUNT"] = str(SPINCOUNT)  # child processes: as in the other order
    return True
