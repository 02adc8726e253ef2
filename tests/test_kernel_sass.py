"""benchmarks/kernel_sass.py: the SASS census counts what the listing holds (predicated instructions,
memory widths), the launcher's specialisation is mimicked, and a kernel really lowers for sm_90a."""
import os
import subprocess
import sys

import pytest

from mixedae_fast.benchmarks import kernel_sass

LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                  /* 0x00000a00ff017b82 */
        /*04a0*/              @!P1 IMAD.IADD R0, R0, 0x1, -R5 ;                            /* 0x0000000100009824 */
        /*0920*/               @P5 LDG.E.U16 R98, desc[UR10][R26.64] ;                     /* 0x0000000a1a625981 */
        /*0930*/                   LDG.E.128 R4, desc[UR10][R2.64] ;                       /* 0x0000000a02047981 */
        /*0940*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                           /* 0x0000000000007b1d */
        /*0950*/               @PT SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;                       /* 0x0c201f0006077f89 */
        /*0960*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;    /* 0x0000000418187df0 */
        /*0970*/                   STG.E.128 desc[UR10][R2.64], R4 ;                       /* 0x0000000402007986 */
        /*0980*/                   EXIT ;                                                  /* 0x000000000000794d */
        .L_x_0:
"""


def test_census_counts_the_listing():
    got = kernel_sass.census(LISTING)
    assert got["instructions"] == 9
    assert (got["BAR"], got["SHFL"], got["HGMMA"], got["HMMA"], got["MUFU"]) == (1, 1, 1, 0, 0)
    assert got["global"] == {"LDG.E.128": 1, "LDG.E.U16": 1, "STG.E.128": 1}


def test_specialise_as_a_launch_would():
    """Strides equal to 1 become constants, multiples of 16 get the divisibility hint, others stay plain."""
    from mixedae_fast.kernels import unmix as um
    ptrs = dict.fromkeys(("tok_ptr", "ids_ptr", "mask_tok_ptr", "pos_ptr", "out_ptr"), "bf16")
    sig, consts, attrs = kernel_sass.specialise(um._unmix_fwd_kernel, dict(R=4, BLOCK_L=4, BLOCK_D=128, BLOCK_V=64),
                                                ptrs, {"N": 1, "D": 512, "NV": 49})
    assert sig["tok_ptr"] == "*bf16" and attrs[(0,)] == [["tt.divisibility", 16]]
    assert sig["N"] == "constexpr" and consts["N"] == 1
    names = list(sig)
    assert attrs[(names.index("D"),)] == [["tt.divisibility", 16]] and (names.index("NV"),) not in attrs


@pytest.mark.skipif(sys.platform != "linux", reason="Triton ships ptxas and cuobjdump for Linux only")
def test_a_kernel_lowers_and_is_counted(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "mixedae_fast.benchmarks.kernel_sass", "--only", "unmix_fwd",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    result = json.loads(out.read_text())
    assert result["target"] == "sm_90a" and result["git_sha"] and result["command"]
    (row,) = result["rows"]
    assert row["kernel"] == "unmix_fwd" and row["registers"] > 0 and row["instructions"] > 100
    assert row["global"].get("STG.E.128", 0) > 0       # the decoder rows are stored 16 bytes a thread
    refused = subprocess.run([sys.executable, "-m", "mixedae_fast.benchmarks.kernel_sass", "--only", "unmix_fwd"],
                             capture_output=True, text=True, env={**env, "TRITON_INTERPRET": "1"}, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: TRITON_INTERPRET=1")
