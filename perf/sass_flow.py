"""Instructions a compiled kernel executes, counted from its SASS without running it.

``count(sass, kernel)`` reads the ``nvdisasm -c`` listing of one cubin and returns, for the kernel
function, the instructions one thread (one warp: SASS is issued per warp, and a warp instruction
is 32 thread-instructions whatever its predicate) executes on ordinary data, split into the
*straight* part, run once per program, and the *loops*, run once per iteration:

1. The listing is cut into basic blocks: a block starts at a label (a branch target) and after a
   branch, ``EXIT`` or ``RET``; edges go to a branch's target and, unless the block ends in an
   unconditional branch, exit or return, to the next block (a branch is conditional with a
   ``@P`` guard or, as sm_100's ``BRA.U !UP0, target``, a predicate operand).
2. Hot blocks are those reachable from the entry without entering a *cold* block: a block that
   calls a subroutine (``CALL``: the slow paths of the correctly rounded division and square root
   and of 64-bit integer division, which take over only for operands near the ends of the range
   and which ptxas places after the kernel), or that holds an unpredicated volatile load
   (``LDG...STRONG.SYS``), the mark ``kernels/common.py`` (``_cold_path``) puts at the entry of a
   branch ordinary data never takes (the rescaled statistics of planes whose squares would
   overflow); the kernels load nothing else volatile. Subroutines are not counted; neither are the
   blocks reached only through a cold block.
   ``BRA.DIV`` (a shuffle sequence's branch to its fallback for a warp whose threads have
   diverged, which the kernels' warp-uniform code never is) falls through; its target is not
   followed.
3. A hot branch to an address at or before its own is a loop's back edge; the loop body is the hot
   code from the target to the branch. Loops must not nest (the kernels' loops are sweeps over
   a plane's tiles; the pass model in perf/sass.py knows their trip counts); ``nested`` says
   when they do.

Per block and loop the counts of a few kinds of instructions are kept (global loads and stores,
shuffles, barriers, special-function ops), to tell where the instructions go.
"""

from __future__ import annotations

import re

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^([.$\w]+):\s*$")
_FUNCTION = re.compile(r"^\s*\.type\s+([.$\w]+),@function")
_TARGET = re.compile(r"`\(([^)]+)\)")
_PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")
# sm_100's uniform branches take their predicate as an operand: "BRA.U !UP0, `(.L_x_0)"
_OPERAND_PREDICATE = re.compile(r"^\S+\s+!?U?P\d+\s*,")

# Kinds of instructions reported separately, by opcode prefix.
KINDS = {
    "ldg": ("LDG",), "stg": ("STG",), "shfl": ("SHFL",), "bar": ("BAR",),
    "smem": ("LDS", "STS"), "mufu": ("MUFU",), "cluster": ("UCGABAR", "CCTL", "MEMBAR"),
}
COLD_MARK = re.compile(r"^LDG\S*\.STRONG\.SYS\b")  # a volatile load: _cold_path


def _opcode(text):
    """(predicated, opcode with its modifiers) of an instruction."""
    bare = _PREDICATE.sub("", text)
    return bare != text, bare.split()[0] if bare else ""


def functions(sass: str) -> dict[str, list]:
    """{function: [(address, text) or (None, label)]}, in listing order."""
    out, current = {}, None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            current.append((int(m.group(1), 16), m.group(2)))
            continue
        m = _LABEL.match(line)
        if m:
            current.append((None, m.group(1)))
    return out


class _Block:
    def __init__(self, index):
        self.index = index
        self.labels = []
        self.instructions = []  # (address, text)
        self.successors = []  # labels, or None for the next block

    @property
    def start(self):
        return self.instructions[0][0]

    @property
    def end(self):
        return self.instructions[-1][0]


def blocks(listing) -> list[_Block]:
    out = [_Block(0)]
    for address, text in listing:
        current = out[-1]
        if address is None:  # a label starts a block
            if current.instructions:
                current = _Block(len(out))
                out.append(current)
            current.labels.append(text)
            continue
        current.instructions.append((address, text))
        predicated, op = _opcode(text)
        base = op.split(".")[0]
        if base in ("BRA", "JMP", "BRX", "EXIT", "RET"):
            target = _TARGET.search(text)
            divergent = op.startswith("BRA.DIV")  # to the divergent-warp fallback: not followed
            if base in ("BRA", "JMP") and target and not divergent:
                current.successors.append(target.group(1))
            if predicated or divergent or base == "BRX" or _OPERAND_PREDICATE.search(text):
                current.successors.append(None)
            out.append(_Block(len(out)))
        elif base == "CALL":
            current.successors.append(None)  # returns to the next instruction
    for block in out[:-1]:  # a block cut by a label falls through unless it ended in a branch
        if block.instructions and not _ends_in_transfer(block):
            block.successors.append(None)
    return [b for b in out if b.instructions]


def _ends_in_transfer(block):
    predicated, op = _opcode(block.instructions[-1][1])
    return op.split(".")[0] in ("BRA", "JMP", "BRX", "EXIT", "RET")


def _is_cold(block):
    for _, text in block.instructions:
        predicated, op = _opcode(text)
        if op.startswith("CALL") or (not predicated and COLD_MARK.match(op)):
            return True
    return False


def _kinds(instructions):
    counts = {kind: 0 for kind in KINDS}
    for _, text in instructions:
        op = _opcode(text)[1]
        for kind, prefixes in KINDS.items():
            if op.startswith(prefixes):
                counts[kind] += 1
    return counts


def count(sass: str, kernel: str) -> dict:
    """{"straight": n, "loops": [{"body": n, "kinds": {...}}], "nested": bool, "hot": n,
    "cold": n, "subroutines": n, "kinds": {...}} of ``kernel`` in the listing ``sass``."""
    listing = functions(sass)
    if kernel not in listing:
        raise ValueError(f"no function {kernel!r} in the listing: {sorted(listing)}")
    bbs = blocks(listing[kernel])
    by_label = {label: b for b in bbs for label in b.labels}
    by_index = {b.index: b for b in bbs}
    order = [b.index for b in bbs]

    def successors(block):
        for label in block.successors:
            if label is None:
                position = order.index(block.index) + 1
                if position < len(order):
                    yield by_index[order[position]]
            elif label in by_label:
                yield by_label[label]

    hot, pending = set(), [bbs[0]]
    while pending:
        block = pending.pop()
        if block.index in hot or _is_cold(block):
            continue
        hot.add(block.index)
        pending.extend(successors(block))
    hot_blocks = [b for b in bbs if b.index in hot]
    loops = []
    for block in hot_blocks:
        for succ in successors(block):
            if succ.index in hot and succ.start <= block.end:
                loops.append((succ.start, block.end))
    loops = sorted(set(loops))
    nested = any(a[1] >= b[0] for a, b in zip(loops, loops[1:]))
    loop_bodies = []
    in_loops = 0
    for start, end in loops:
        body = [i for b in hot_blocks for i in b.instructions if start <= i[0] <= end]
        loop_bodies.append({"body": len(body), "kinds": _kinds(body)})
        in_loops += len(body)
    hot_instructions = [i for b in hot_blocks for i in b.instructions]
    return {
        "straight": len(hot_instructions) - (0 if nested else in_loops),
        "loops": loop_bodies,
        "nested": nested,
        "hot": len(hot_instructions),
        "cold": sum(len(b.instructions) for b in bbs) - len(hot_instructions),
        "subroutines": sum(address is not None for k, v in listing.items() if k != kernel
                           for address, _ in v),
        "kinds": _kinds(hot_instructions),
    }
