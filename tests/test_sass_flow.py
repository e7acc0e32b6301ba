"""perf/sass_flow.py counts what a kernel executes from its SASS: hot blocks, loops, cold paths.

A synthetic ``nvdisasm -c`` listing in the form ptxas emits: a prologue, a slow-path call behind a
branch, a loop whose body holds another slow path, a branch marked cold by a volatile load (with
a loop of its own), a subroutine after the kernel and the trailing self-branch.
"""

from perf import sass_flow

LISTING = """
        .type           _fwd,@function
_fwd:
.text._fwd:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   FCHK P0, R2, R3 ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/                   MOV R2, 0x60 ;
        /*0050*/                   CALL.REL.NOINC `($__internal_0_$__div_slowpath) ;
        /*0060*/                   MOV R5, R0 ;
.L_x_0:
        /*0070*/                   BSYNC B0 ;
.L_x_1:
        /*0080*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0090*/                   FADD R9, R8, R9 ;
        /*00a0*/              @!P1 BRA `(.L_x_2) ;
        /*00b0*/                   CALL.REL.NOINC `($__internal_0_$__div_slowpath) ;
.L_x_2:
        /*00c0*/                   SHFL.BFLY PT, R3, R9, 0x10, 0x1f ;
        /*00d0*/               @P2 BRA `(.L_x_1) ;
        /*00e0*/                   FSETP.GTU.AND P3, PT, R9, +INF , PT ;
        /*00f0*/              @!P3 BRA `(.L_x_4) ;
        /*0100*/                   LDG.E.STRONG.SYS R12, desc[UR4][R6.64] ;
.L_x_3:
        /*0110*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0120*/               @P2 BRA `(.L_x_3) ;
.L_x_4:
        /*0130*/               @P5 LDG.E.STRONG.SYS R13, desc[UR4][R6.64] ;
        /*0140*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0150*/                   EXIT ;
.L_x_5:
        /*0160*/                   BRA `(.L_x_5);
        .type           $__internal_0_$__div_slowpath,@function
$__internal_0_$__div_slowpath:
        /*0170*/                   FFMA R0, R1, R2, R3 ;
        /*0180*/                   RET.REL.NODEC R2 `(_fwd) ;
"""


def test_counts_the_hot_path_and_one_loop():
    counts = sass_flow.count(LISTING, "_fwd")
    # loop 0x80..0xd0 without the call block at 0xb0: LDG, FADD, BRA, SHFL, BRA
    assert counts["loops"] == [{"body": 5, "kinds": dict(
        ldg=1, stg=0, shfl=1, bar=0, smem=0, mufu=0, cluster=0)}]
    assert not counts["nested"]
    # straight: 0x00-0x30 (4), BSYNC (1), FSETP + BRA (2), the predicated mark, STG, EXIT (3)
    assert counts["straight"] == 10
    # cold: the call blocks (3 + 1), the marked branch and its loop (1 + 2), the self-branch
    assert counts["cold"] == 8
    assert counts["subroutines"] == 2


def test_unknown_kernel_is_an_error():
    try:
        sass_flow.count(LISTING, "_bwd")
    except ValueError as e:
        assert "_fwd" in str(e)
    else:
        raise AssertionError("no error")


def test_nested_loops_are_flagged():
    nested = """
        .type           _k,@function
_k:
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
.L_x_1:
        /*0020*/                   FADD R1, R1, R2 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/               @P1 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""
    assert sass_flow.count(nested, "_k")["nested"]


def test_divergent_warp_fallbacks_are_not_followed():
    """BRA.DIV jumps to a shuffle sequence's fallback for a diverged warp, which branches back:
    neither a loop nor part of the hot path."""
    listing = """
        .type           _k,@function
_k:
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   BRA.DIV UR4, `(.L_x_1) ;
        /*0020*/                   SHFL.BFLY PT, R1, R0, 0x1, 0x1f ;
.L_x_0:
        /*0030*/                   FADD R0, R0, R1 ;
        /*0040*/                   EXIT ;
.L_x_1:
        /*0050*/                   WARPSYNC.COLLECTIVE R2, `(.L_x_2) ;
.L_x_2:
        /*0060*/                   BRA `(.L_x_0) ;
"""
    counts = sass_flow.count(listing, "_k")
    assert counts["loops"] == [] and counts["straight"] == 5 and counts["cold"] == 2
