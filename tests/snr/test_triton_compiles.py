"""The Triton kernels (the measurements' and the optimizer step's) compile for a CUDA GPU (sm_90),
here, without one: Triton's interpreter, which the other Triton tests run on a CPU, accepts
programs that its GPU compiler rejects (a loop-carried value that changes type, a mask of the
wrong shape, ...). Each kernel is compiled to machine code (ptx and cubin, with the ptxas that
Triton ships) for the kinds of launch `gpu.precision_sums`, `gpu.snr_sums` and
`gpu.triton_step` make, with the constants they pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed")


def _launches():
    """(kernel name, signature, constants) of every kind of launch the drivers make."""
    import triton.language as tl

    dtypes = (tl.float32, tl.bfloat16, tl.float16)
    table = dict(ids="*i64", starts="*i64", count="i32")
    out = []
    for mt in dtypes[:2]:
        for vt in dtypes[:2]:
            out.append(("precision_tiles",
                        dict(mv="*i64", sizes="*i64", scalars="*fp32", **table, partial="*fp64", m8_map="*fp32",
                             m8_thr="*fp32", m4_map="*fp32", m4_thr="*fp32", v8_map="*fp32", v8_thr="*fp32"),
                        dict(LOG=3, MT=mt, VT=vt, TILE=256, PER=8)))
    out.append(("precision_total", dict(partial="*fp64", sizes="*i64", out="*fp64"), dict(CB=64)))
    for xt in dtypes:
        for sb, nb, kd, rd in ((128, 16, 2, 1), (8, 256, 0, 3)):
            out.append(("snr_whole", dict(xs="*i64", table="*i64", **table, partial="*fp64"),
                        dict(LOG=2, XT=xt, SB=sb, KD=kd, NB=nb, RD=rd)))
        out.append(("snr_split", dict(xs="*i64", table="*i64", **table, scratch="*fp64"),
                    dict(LOG=1, XT=xt, SB=2, KD=0, NB=1024, RD=2, SEG=1 << 16)))
        out.append(("snr_split_terms", dict(xs="*i64", table="*i64", **table, scratch="*fp64", partial="*fp64"),
                    dict(LOG=1, XT=xt, SB=8, KD=1)))
    out.append(("snr_total", dict(partial="*fp64", table="*i64", out="*fp64"), dict(CB=64)))
    # the optimizer step's (`gpu.triton_step`), with the same compile-first launcher
    step = dict(ptrs="*i64", tasks="*i64", **table)
    scalars = ("decay", "omb1", "beta2", "omb2", "bc2", "eps", "neg_step_size", "sign")
    for t in dtypes[:2]:
        out.append(("row_sums", dict(step, partial="*fp32"), dict(LOG=3, GT=t, CH=4096, BLOCK=1024)))
        out.append(("col_sums", dict(step, partial="*fp32"), dict(LOG=3, GT=t, RB=16, WIDTH=64, ROWS=256)))
        out.append(("finalize", dict(step, partial="*fp32", dens="*fp32", beta2="fp32", omb2="fp32", bc2="fp32",
                                     eps="fp32"), dict(LOG=3, VT=t, BLOCK=128, CB=32)))
        for mf, vf, full, block in ((0, 0, False, 1024), (1, 1, True, 1024), (2, 0, False, 256), (3, 0, False, 128),
                                    (2, 2, True, 256)):
            out.append(("update", dict(step, dens="*fp32", m_map="*fp32", m_thr="*fp32", v_map="*fp32", v_thr="*fp32",
                                       **{name: "fp32" for name in scalars}),
                        dict(LOG=3, PT=t, MF=mf, VF=vf, FULL=full, BLOCK=block)))
    return out


def main() -> int:
    """Compile every launch (run without TRITON_INTERPRET); print one line per kernel, exit 3
    where Triton has no CUDA backend or ptxas here."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        print(f"no CUDA backend: {e}")
        return 3
    from lowmem.compress.optim import gpu, triton_kernels

    assert gpu.EXACT == {"enable_fp_fusion": False}
    for name, signature, constants in _launches():
        fn = getattr(triton_kernels, name)
        full = {**signature, **{c: "constexpr" for c in constants}}
        src = ASTSource(fn, {a: full[a] for a in fn.arg_names}, constexprs=constants)
        options = dict(gpu.EXACT) if name.startswith(("precision", "snr")) else {}
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except RuntimeError as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                print(f"no ptxas: {e}")
                return 3
            raise
        assert kernel.asm.get("cubin"), name   # machine code, not only the IR
        print("compiled", name)
    return 0


def test_every_measurement_kernel_compiles_for_a_cuda_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # (the interpreter compiles nothing)
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("compiled ")}
    assert compiled == {"precision_tiles", "precision_total", "snr_whole", "snr_split", "snr_split_terms",
                        "snr_total", "row_sums", "col_sums", "finalize", "update"}, done.stdout


if __name__ == "__main__":
    sys.exit(main())
