"""What the Triton kernels compile to on a Hopper GPU, read without one: each kernel lowered for sm_90a by
Triton's own compiler and the ptxas it ships, then counted.

    python -m mixedae_fast.benchmarks.kernel_sass --out benchmarks/results/<date>_cpu-sm90-static/kernel_sass.json

Per kernel (and per forward tiling of the fused TopK kernel, with and without its select) at ViT-B/16's
shapes: registers, spilled bytes, shared memory, the instruction count of the SASS (``cuobjdump``; the
loops Triton unrolls count once per copy, a ``range`` loop once) and a census: barriers (``BAR``), warp
shuffles (``SHFL``), tensor-core instructions (``HGMMA`` is Hopper's wgmma, ``HMMA`` the older mma.sync),
special functions (``MUFU``: exp2, log2, rcp), and global loads and stores by width (``LDG.E.128`` moves
16 bytes a thread, ``LDG.E`` 4). No timing: these are the compiler's facts, for choosing what to time on
the card (docs/kernel_notes.md). A CPU machine with the ``triton`` wheel runs it in about a minute.

The mixing kernels are counted at ``bench_kernels --config vit_base``'s shapes (bf16 images of 224 px in
16 px patches, the decoder's 512 channels): ``patch_mix`` in every autotune config it may take there.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mixedae_fast import measured
from mixedae_fast.benchmarks.common import result_head

# ViT-B/16 at 224 px, batch 256 in groups of 4 (bench_attention's vit_b, bench_kernels' vit_base)
L, HEAD_DIM, PATCH, N, R, NV, DEC_DIM = 197, 64, 16, 196, 4, 49, 512


def specialise(fn, consts: dict, ptrs: dict, ints: dict, scale: str = "fp32") -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) for ``fn`` as Triton's launcher specialises a real call:
    pointers typed by ``ptrs`` (name -> dtype) and 16-byte aligned (as torch allocates); an integer
    argument whose value in ``ints`` is 1 becomes the constant 1, one divisible by 16 gets that hint (what
    lets the compiler vectorise loads); ``scale`` / ``EPS`` floats (``scale`` typed as asked)."""
    sig, consts, attrs = {}, dict(consts), {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "EPS"):
            sig[name] = scale if name == "scale" else "fp32"
        elif ints[name] == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _strides(*shape: int) -> tuple[int, ...]:
    """A contiguous tensor's strides, in elements."""
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def attention_cases(seq: int = L, dtype: str = "bf16", tilings: tuple[str, ...] | None = None,
                    ablations: bool = False, bwd_tilings: tuple[str, ...] | None = None) -> list[dict]:
    """The fused TopK kernels at ``seq`` tokens, 12 heads of 64 channels, batch of 64 groups in ``dtype``:
    the forward in each of ``tilings`` (default: all; with ``ablations`` also with the radix select and
    without a select), the backward in each of ``bwd_tilings`` (default: the default one). ``fp32`` lowers
    as the library launches it on a GPU (IEEE dots, 16 rows; :data:`BWD_FP32`)."""
    import triton

    from mixedae_fast.kernels import homologous_attention as ha

    att = {n: dtype for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
    att.update(src_ptr="i32", bits_ptr="i32", lse_ptr="fp32", hc_ptr="fp32", ghc_ptr="fp32", dqacc_ptr="fp32")
    H = 12
    # q, k, v as the attention module makes them: views of one [B, L, 3, H, d] projection; dO contiguous
    qkv = (seq * 3 * H * HEAD_DIM, HEAD_DIM, 3 * H * HEAD_DIM)
    ints = dict(zip(("sqg", "sqh", "sql", "skg", "skh", "skl", "svg", "svh", "svl"), qkv * 3, strict=True))
    ints.update(zip(("sdg", "sdh", "sdl"), _strides(64, H, seq, HEAD_DIM)[:3], strict=True))
    ints.update(H=H, L=seq, D=HEAD_DIM, TOPK=min(NV, seq - 1), HC_HEADS=1)  # the HC loss on head 0 (the default)
    ieee = dtype == "fp32"
    bn, bd = ha._blocks(seq, HEAD_DIM)
    fwd = {"ieee": (16, ha.NUM_WARPS)} if ieee else {t: measured.FWD_TILINGS[t]
                                                     for t in tilings or measured.FWD_TILINGS}
    out = []
    for tiling, (rows, warps) in fwd.items():
        for select in measured.SELECTS if ablations else ("search",):
            flag = "" if select == "search" else f",{select}-select" if select == "radix" else ",no-select"
            out.append(dict(name=f"topk_fwd[{tiling}{flag}]", fn=ha._fwd_kernel,
                            consts=dict(BLOCK_M=rows, BLOCK_N=bn, BLOCK_D=bd, HC=True, FP32=ieee,
                                        SELECT=measured.SELECTS[select], MAX_PASSES=ha.MAX_PASSES, FALLBACK=True),
                            ptrs=att, ints=ints, warps=warps))
    bwd = {"ieee": ha.BWD_FP32} if ieee else {t: measured.BWD_TILINGS[t]
                                              for t in bwd_tilings or (measured.DEFAULT_BWD_TILING,)}
    for tiling, (keys, rows, warps, stages) in bwd.items():
        consts = dict(HC=True, FP32=ieee, M_BLOCKS=triton.cdiv(seq, rows), N_BLOCKS=triton.cdiv(seq, keys),
                      BLOCK_M=rows, BLOCK_N=keys, BLOCK_D=bd, WORDS=bn // 32)
        out.append(dict(name=f"topk_bwd[{tiling}]", fn=ha._bwd_kernel, ptrs=att, ints=ints, warps=warps,
                        stages=stages, consts=consts))
    return out


def cases() -> list[dict]:
    """Every kernel this tool lowers: ``name, fn, consts, ptrs, ints`` (the integer arguments' values at
    ViT-B/16's shapes, which decide the launcher's specialisation) and ``warps``."""
    import triton

    from mixedae_fast.kernels import patch_mix as pm
    from mixedae_fast.kernels import unmix as um

    out = attention_cases(ablations=True, bwd_tilings=tuple(measured.BWD_TILINGS))
    mix = dict(img_ptr="bf16", ids_ptr="i32", mixed_ptr="bf16", tgt_ptr="fp32", mask_ptr="u8")
    grid_w = 224 // PATCH
    ints = dict(zip(("s_b", "s_c", "s_h", "s_w"), _strides(256, 3, 224, 224), strict=True), N=N, GRID_W=grid_w,
                NV=NV)
    meta = dict(P=PATCH, PATCH_DIM=3 * PATCH * PATCH, NORM_PIX=True, EPS=1e-6,
                BLOCK_P=triton.next_power_of_2(PATCH), BLOCK_V=triton.next_power_of_2(NV))
    tuner = pm._patch_mix_tuned
    for config in pm._prune_patch_mix_configs(tuner.configs, {"P": PATCH, "GRID_W": grid_w}) if tuner else []:
        bw = config.kwargs["BLOCK_WI"]
        out.append(dict(name=f"patch_mix[wi{bw},w{config.num_warps}]", fn=pm._patch_mix_kernel,
                        consts=dict(meta, BLOCK_WI=bw), ptrs=mix, ints=ints, warps=config.num_warps))

    unmix = dict(tok_ptr="bf16", mask_tok_ptr="bf16", pos_ptr="bf16", out_ptr="bf16", ids_ptr="i32",
                 gout_ptr="bf16", gtok_ptr="bf16", part_ptr="fp32")
    ints = dict(N=N, D=DEC_DIM, NV=NV)
    block_l, block_d = um._blocks(N + 1, DEC_DIM, max_d=128, tile=2048)
    out.append(dict(name="unmix_fwd", fn=um._unmix_fwd_kernel, ptrs=unmix, ints=ints, warps=4,
                    consts=dict(R=R, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_V=triton.next_power_of_2(NV))))
    block_l, block_d = um._blocks(N, DEC_DIM, max_d=64, tile=1024)
    out.append(dict(name="unmix_bwd", fn=um._unmix_bwd_kernel, ptrs=unmix, ints=ints, warps=4,
                    consts=dict(R=R, ROW_BLOCKS=triton.cdiv(N, block_l), BLOCK_L=block_l, BLOCK_D=block_d,
                                BLOCK_V=triton.next_power_of_2(NV))))
    return out


_OPCODE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_COUNTED = ("BAR", "SHFL", "HGMMA", "HMMA", "MUFU", "LDS", "STS", "LDL", "STL")


def census(sass: str) -> dict:
    """Instruction counts of a SASS listing: the total, the families in ``_COUNTED``, and global loads and
    stores by their full opcode (the width is in the suffix)."""
    ops = [m.group(1) for line in sass.splitlines() if (m := _OPCODE.match(line))]
    base = collections.Counter(op.split(".")[0] for op in ops)
    memory = collections.Counter(op for op in ops if op.split(".")[0] in ("LDG", "STG", "LDGSTS"))
    return {"instructions": len(ops), **{family: base[family] for family in _COUNTED},
            "global": dict(sorted(memory.items()))}


def lower(name: str, fn, consts: dict, ptrs: dict, ints: dict, warps: int, scale: str = "fp32",
          stages: int | None = None) -> dict:
    """One kernel lowered for sm_90a, specialised as a real launch would be (:func:`specialise`): ptxas's
    resource report and the SASS census."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sig, consts, attrs = specialise(fn, consts, ptrs, ints, scale)
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, **({} if stages is None else {"num_stages": stages})))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([tools / "ptxas", "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([tools / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    layouts = sorted(set(re.findall(r"nvidia_mma<\{versionMajor = (\d)[^}]*warpsPerCTA = \[([\d, ]+)\]",
                                    kernel.asm["ttgir"])))
    return {"kernel": name, "warps": warps, "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)),
            "shared_bytes": kernel.metadata.shared,
            "mma": [f"v{major} warps [{warps_per}]" for major, warps_per in layouts], **census(sass)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated name prefixes (topk_fwd, patch_mix, ...)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: the interpreter compiles nothing; run without it", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: kernel_sass needs the triton package (Linux)", file=sys.stderr)
        return 2
    prefixes = [x for x in (args.only or "").split(",") if x]
    result = result_head("kernel_sass", torch.device("cpu"), ["python", "-m", "mixedae_fast.benchmarks.kernel_sass"],
                         argv, target="sm_90a", triton=__import__("triton").__version__, rows=[])
    print(f"{'kernel':<28}{'warps':>6}{'regs':>6}{'spill':>7}{'smem':>7}{'instr':>7}{'BAR':>5}{'SHFL':>6}"
          f"{'HGMMA':>6}{'HMMA':>6}{'MUFU':>6}  global", flush=True)
    for case in cases():
        name, warps = case["name"], case["warps"]
        if prefixes and not any(name.startswith(x) for x in prefixes):
            continue
        row = lower(**case)
        result["rows"].append(row)
        wide = " ".join(f"{op}:{n}" for op, n in row["global"].items())
        print(f"{name:<28}{warps:>6}{row['registers']:>6}{row['spill_stores']:>7}{row['shared_bytes']:>7}"
              f"{row['instructions']:>7}{row['BAR']:>5}{row['SHFL']:>6}{row['HGMMA']:>6}{row['HMMA']:>6}"
              f"{row['MUFU']:>6}  {wide}", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
