"""Count the SASS instructions one thread issues along one path through a kernel.

    cuobjdump -sass obj.o > k.sass
    python benchmarks/sass_path.py k.sass e_step_tiles_kernelIf 1550 f1a0 "15d0:T,17b0:T,..."

Arguments: the `cuobjdump -sass` listing, a substring of the kernel's (mangled) name, the
start and stop addresses (hex; the stop is not counted) and the branch decisions: each
conditional branch at ADDR takes the next letter of its list (T taken, N not taken; a loop's
back edge gets one letter per trip). A conditional branch without a decision is listed and
treated as not taken, so the decisions are filled in by reading the listing around it.
CALL/RET are followed (device functions count toward the path); predicated instructions
count whether or not their predicate holds (they are issued either way).

benchmarks/README.md ("Bandwidth model") gives the counts this produced for the E-step and
loss kernels (the path of a list of 4 slots with 3 ranked, K = 8).
"""

from __future__ import annotations

import re
import sys

_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"(@!?U?P\w+\s+)?BRA(\.\w+)*\s+.*?(0x[0-9a-f]+)")


def read_kernel(path, name):
    """[(address, instruction)] of the first function whose name contains `name`."""
    text = open(path).read()
    funcs = [f for f in re.split(r"\n\s*Function : ", text)[1:] if name in f.split("\n", 1)[0]]
    if not funcs:
        raise SystemExit(f"no function matching {name!r} in {path}")
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in map(_INSTR.match, funcs[0].split("\n")) if m]


def walk(code, start, stop, decisions):
    """(instructions issued, MUFU among them, undecided branches) from start to stop."""
    ins = dict(code)
    order = [a for a, _ in code]
    nxt = {a: order[i + 1] for i, a in enumerate(order[:-1])}
    pc, n, mufu, undecided, stack = start, 0, 0, [], []
    for _ in range(1_000_000):
        if pc == stop:
            break
        s = ins[pc]
        if s.startswith("EXIT"):
            break
        if not s.startswith("NOP"):
            n += 1
            mufu += "MUFU" in s
        if s.startswith("CALL"):
            stack.append(nxt[pc])
            pc = int(re.search(r"0x[0-9a-f]+", s).group(0), 16)
            continue
        if s.startswith("RET"):
            pc = stack.pop()
            continue
        m = _BRANCH.match(s)
        if m:
            taken = True
            if m.group(1):  # conditional
                d = decisions.get(pc)
                if d:
                    taken = d.pop(0) == "T"
                else:
                    undecided.append(f"{pc:x}: {s}")
                    taken = False
            if taken:
                pc = int(m.group(3), 16)
                continue
        pc = nxt[pc]
    return n, mufu, undecided


def main(argv):
    path, name, start, stop = argv[:4]
    decisions = {}
    for item in (argv[4].split(",") if len(argv) > 4 and argv[4] else []):
        addr, d = item.split(":")
        decisions[int(addr, 16)] = list(d)
    n, mufu, undecided = walk(read_kernel(path, name), int(start, 16), int(stop, 16), decisions)
    print(f"{n} instructions, {mufu} MUFU")
    for u in undecided:
        print("  undecided (not taken):", u)


if __name__ == "__main__":
    main(sys.argv[1:])
