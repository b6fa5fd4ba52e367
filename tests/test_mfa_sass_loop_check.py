"""The SASS reader behind build_check's tile-loop local-memory check (dev/mfa/sass_loop_check.py)."""
from dev_module import load_dev_module

check = load_dev_module("dev/mfa/sass_loop_check.py", "sass_loop_check")

SASS = """
        Function : _ZN6afdkit3mfa4sm9018decode_sm90_kernelE
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   LDS R4, [R3] ;
        /*0030*/                   LDL R5, [R1] ;
        /*0040*/                   HGMMA.64x128x16.F32 R24, R152, gdesc[UR4].tnspB, R24 ;
        /*0050*/                   HGMMA.64x128x16.F32 R88, R152, gdesc[UR8].tnspB, R88 ;
        /*0060*/              @!P0 BRA 0x20 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x0 ;
"""


def test_finds_the_innermost_loop_around_the_pv_wgmmas():
    insns = check.kernels(SASS)["_ZN6afdkit3mfa4sm9018decode_sm90_kernelE"]
    # 0x20..0x60 holds both PV wgmmas and one LDL; the out-of-line 0x80 -> 0x0 branch
    # covers more (and the STL at 0x10) but is not the tile loop.
    assert check.check_kernel(insns) == (0x20, 0x60, 1)


def test_a_loop_without_local_memory_passes_and_no_pv_is_no_answer():
    clean = SASS.replace("LDL R5, [R1]", "LDS R5, [R3]")
    insns = check.kernels(clean)["_ZN6afdkit3mfa4sm9018decode_sm90_kernelE"]
    assert check.check_kernel(insns) == (0x20, 0x60, 0)
    no_pv = check.kernels(clean.replace("HGMMA.64x128x16", "HGMMA.64x64x16"))
    assert check.check_kernel(no_pv["_ZN6afdkit3mfa4sm9018decode_sm90_kernelE"]) is None
