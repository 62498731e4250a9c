"""One GEMM with the LoRA term inside it, for Hopper: out = X·Y (+ the low-rank term) (+ bias), on TMA descriptors
and a persistent grid (KERNELS.md, candidate design 2). The C++ node takes it once Python has registered the
compiled kernels (register_for_node) and set a row threshold (`_C.lora_kernels_set_tma_rows`; peft_fast/ops/one_gemm.py
does both on a layer's first call, dispatch.ONE_GEMM_MIN_ROWS has the measurements);
scripts/probe_lora_kernels.py `tma` times it against cuBLAS and the default route; tests/test_kernels_lora_gemm_tma.py
checks it against `reference` below (interpreter on the CPU, real sizes on the GPU).

    forward   out = x Wᵀ + hs Bᵀ (+ bias)               X = x (M×K), Y = W (N×K, "k-major"), H = hs (M×R), L = B (N×R)
    dx        out = dy W + drop(gs A) = dy W + (gs A) ⊙ keep / (1−p)
                                                      X = dy (M×N'), Y = W (N'×K', row-major), H = gs, L = Aᵀ … as
                                                      L = A stored (R×K') read transposed, keep bits (M × K'/8)

Why: the default route writes the low-rank term (M×N) and lets cuBLAS add its GEMM onto it (beta = 1): one extra
write and one extra read of the output, ~40 µs a direction at 8192×4096 on an H100, which puts a floor of ~1.19× the
bare layer under fwd+bwd. Here the term is one more MMA step after the K loop, into the same fp32 tile (with dropout
the first step instead, scaled by the keep bits before the K loop accumulates onto it), and the output is written
once. It wins only if the GEMM itself keeps up with cuBLAS, hence TMA loads, 128×256 tiles, a persistent grid with
grouped tile order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import _block_r

try:  # host-side TMA descriptors (Triton ≥ 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: lora_gemm is not available (the C++ route needs none)
    TensorDescriptor = None

# Tile shape and pipeline depth by default (Hopper, bf16): the probe sweeps others
# (FLATTEN: the tile and K loops pipelined as one, so the next tile's loads start under this one's epilogue;
# WARP_SPECIALIZE: producer / consumer warps for the K loop, where the Triton build supports it on the GPU)
DEFAULT_CONFIG = {"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8, "FLATTEN": False, "WARP_SPECIALIZE": False,
                  "num_stages": 3, "num_warps": 8}
# dx with dropout bits: half as many columns a tile, so the expanded bits fit in registers beside the accumulator
KEEP_CONFIG = {**DEFAULT_CONFIG, "BN": 128, "num_stages": 4}


HOPPER_SHARED_BYTES = 232448  # a Hopper block's shared memory limit


def _fitting_config(config: dict | None, rank_block: int, has_keep: bool = False) -> dict:
    """The tile config (None: KEEP_CONFIG with keep bits, else DEFAULT_CONFIG) with its pipeline made shallow enough
    for the term's operands: h (BM×BR) and L (BR×BN) are loaded before the K loop and sit in shared memory beside the
    K loop's stages and the output tile, so at 128×256×64 three stages fit rank block 16 but not 32 or 64 (262,168
    bytes asked at 64); those get two."""
    cfg = dict(config if config is not None else KEEP_CONFIG if has_keep else DEFAULT_CONFIG)

    def shared(stages):
        return 2 * (stages * (cfg["BM"] + cfg["BN"]) * cfg["BK"] + cfg["BM"] * cfg["BN"]
                    + (cfg["BM"] + cfg["BN"]) * rank_block)
    while cfg["num_stages"] > 2 and shared(cfg["num_stages"]) > HOPPER_SHARED_BYTES:
        cfg["num_stages"] -= 1
    return cfg


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk the columns together, so their X rows and Y columns stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _lora_gemm_kernel(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr,
                      M, N, K, R, keep_stride, keep_scale,
                      Y_KMAJOR: tl.constexpr, L_RMAJOR: tl.constexpr, HAS_LORA: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                      FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    _lora_gemm_tiles(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, M, N, K, R, keep_stride, keep_scale,
                     Y_KMAJOR, L_RMAJOR, HAS_LORA, HAS_BIAS, HAS_KEEP, BM, BN, BK, BR, GROUP_M, NUM_PROGRAMS,
                     FLATTEN, WARP_SPECIALIZE)


@triton.jit
def _lora_gemm_ptr_kernel(x_ptr, y_ptr, h_ptr, l_ptr, out_ptr, bias_ptr, keep_ptr,
                          M, N, K, R, keep_stride, keep_scale,
                          Y_KMAJOR: tl.constexpr, L_RMAJOR: tl.constexpr, HAS_LORA: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                          FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """The same GEMM over plain pointers, its descriptors made on the device: the form a C++ caller launches
    (compile_for_cpp), whose arguments are pointers and numbers only."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if Y_KMAJOR:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    else:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    _lora_gemm_tiles(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, M, N, K, R, keep_stride, keep_scale,
                     Y_KMAJOR, L_RMAJOR, HAS_LORA, HAS_BIAS, HAS_KEEP, BM, BN, BK, BR, GROUP_M, NUM_PROGRAMS,
                     FLATTEN, WARP_SPECIALIZE)


@triton.jit
def _lora_gemm_tiles(x_desc, y_desc, h_ptr, l_ptr, out_desc, bias_ptr, keep_ptr, M, N, K, R, keep_stride,
                     keep_scale, Y_KMAJOR: tl.constexpr, L_RMAJOR: tl.constexpr, HAS_LORA: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                     FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BM
        n0 = pid_n * BN
        rows = m0 + tl.arange(0, BM)
        cols = n0 + tl.arange(0, BN)
        if HAS_LORA:
            # The term's operands are plain loads issued before the K loop: their latency hides under it (a TMA
            # load after the loop waited ~2 µs a tile, 4 % of the GEMM at 8192×14336 on an H100)
            ranks = tl.arange(0, BR)
            h = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                        other=0.0)
            if L_RMAJOR:  # L stored R×N (dx: A as the adapter holds it)
                low = tl.load(l_ptr + ranks[:, None] * N + cols[None, :],
                              mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0)
            else:  # L stored N×R (forward: B)
                low = tl.load(l_ptr + cols[:, None] * R + ranks[None, :],
                              mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0).T
        if HAS_KEEP:
            # dropout on the term alone: the term first, scaled by the keep bits / (1−p), and the K loop accumulates
            # onto it, so one fp32 tile is live (a second one after the loop spilled: 1.8× the plain GEMM's time).
            # The bits come as one byte a row and 8 columns, expanded in registers (not one load per element, whose
            # 64-bit addresses filled the registers: 255 and 236 bytes spilled at 128×256, ptxas sm_90a); at 128×128
            # tiles with 8 warps (KEEP_CONFIG) the kernel fits in 175 registers with no spill, at 128×256 it spills.
            groups = n0 // 8 + tl.arange(0, BN // 8)
            inside = (rows[:, None] < M) & (groups[None, :] < keep_stride)
            packed = tl.load(keep_ptr + rows[:, None] * keep_stride + groups[None, :], mask=inside, other=0)
            bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            keep = tl.reshape(bits, (BM, BN))
            acc = tl.dot(h, low) * (keep.to(tl.float32) * keep_scale)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in tl.range(k_tiles, warp_specialize=WARP_SPECIALIZE):
            a = x_desc.load([m0, kk * BK])
            if Y_KMAJOR:
                b = y_desc.load([n0, kk * BK]).T
            else:
                b = y_desc.load([kk * BK, n0])
            acc = tl.dot(a, b, acc)
        if HAS_LORA and not HAS_KEEP:  # one more MMA step into the same accumulator
            acc = tl.dot(h, low, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([m0, n0], acc.to(out_desc.dtype))


def lora_gemm(x: torch.Tensor, y: torch.Tensor, *, y_kmajor: bool, h: torch.Tensor | None = None,
              low: torch.Tensor | None = None, low_rmajor: bool = False, bias: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, p: float = 0.0, out: torch.Tensor | None = None,
              config: dict | None = None, num_programs: int | None = None) -> torch.Tensor:
    """out (M×N) = x·(y_kmajor ? yᵀ : y) + [h·(low_rmajor ? low : lowᵀ)] ⊙ [keep / (1−p)] + bias.

    x (M×K), y (N×K or K×N), h (M×R), low (N×R, or R×N with low_rmajor), keep: uint8 bits M×(N/8) (bit j of byte c
    keeps column 8c + j), bias (N). All 2-D contiguous in one dtype (bf16 / fp16; fp32 in the interpreter), rows
    16-byte aligned (widths multiples of 8), as TMA needs."""
    if TensorDescriptor is None:
        raise RuntimeError("lora_gemm needs Triton's host TMA descriptors (triton.tools.tensor_descriptor)")
    m, k = x.shape
    n = y.shape[0] if y_kmajor else y.shape[1]
    if (y.shape[1] if y_kmajor else y.shape[0]) != k:
        raise ValueError(f"lora_gemm: x is {tuple(x.shape)}, y {tuple(y.shape)} (y_kmajor={y_kmajor})")
    has_lora = h is not None
    if has_lora != (low is not None) or (keep is not None and not has_lora):
        raise ValueError("lora_gemm: h and low come together, and keep bits only with them")
    r = h.shape[1] if has_lora else 0
    br = _block_r(r) if has_lora else 16
    cfg = _fitting_config(config, br, keep is not None)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    group_m = cfg.pop("GROUP_M")
    flatten, warp_specialize = cfg.pop("FLATTEN", False), cfg.pop("WARP_SPECIALIZE", False)
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    y_desc = TensorDescriptor.from_tensor(y, [bn, bk] if y_kmajor else [bk, bn])
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    if has_lora:
        if (low.shape[0] if low_rmajor else low.shape[1]) != r or (low.shape[1] if low_rmajor else low.shape[0]) != n:
            raise ValueError(f"lora_gemm: h is {tuple(h.shape)}, low {tuple(low.shape)} (low_rmajor={low_rmajor}), "
                             f"out {m}×{n}")
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = max(1, min(num_programs, tiles))
    dummy = out  # (pointer arguments of branches that are compiled out)
    _lora_gemm_kernel[(programs,)](
        x_desc, y_desc, h if has_lora else dummy, low if has_lora else dummy, out_desc,
        bias if bias is not None else dummy, keep if keep is not None else dummy, m, n, k, r, n // 8,
        1.0 / (1.0 - p) if keep is not None else 1.0,
        Y_KMAJOR=y_kmajor, L_RMAJOR=low_rmajor, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        HAS_KEEP=keep is not None, BM=bm, BN=bn, BK=bk, BR=br, GROUP_M=group_m, NUM_PROGRAMS=programs,
        FLATTEN=flatten, WARP_SPECIALIZE=warp_specialize, **cfg)
    return out


def reference(x, y, *, y_kmajor, h=None, low=None, low_rmajor=False, bias=None, keep=None, p=0.0):
    """lora_gemm in fp32 torch ops (the keep bits unpacked), rounded to x's dtype once."""
    out = x.float() @ (y.float().t() if y_kmajor else y.float())
    if h is not None:
        term = h.float() @ (low.float() if low_rmajor else low.float().t())
        if keep is not None:
            bits = (keep.long()[:, :, None] >> torch.arange(8, device=keep.device)) & 1
            term = term * bits.reshape(keep.shape[0], -1)[:, : term.shape[1]].float() / (1.0 - p)
        out = out + term
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time form for a C++ launcher (csrc/triton_launch.h): one cubin a flag set, tile config and rank block

_PTX_KINDS = {".u64": "p", ".b64": "p", ".u32": "i", ".b32": "i", ".s32": "i", ".f32": "f"}
USER_PARAMS = 13  # _lora_gemm_ptr_kernel's runtime arguments, before Triton's hidden scratch pointers


def _param_kinds(ptx: str, name: str) -> str:
    """The entry's parameters as 'p' (64-bit pointer), 'i' (32-bit int), 'f' (fp32), read from its PTX."""
    start = ptx.index(f".entry {name}(")
    body = ptx[start: ptx.index(")", start)]
    kinds = []
    for line in body.splitlines()[1:]:
        parts = line.split()
        if not parts or parts[0] != ".param":
            continue
        if parts[1] not in _PTX_KINDS:
            raise ValueError(f"{name}: parameter type {parts[1]} has no C++ launcher kind")
        kinds.append(_PTX_KINDS[parts[1]])
    return "".join(kinds)


def compile_for_cpp(*, dtype: torch.dtype, capability: int, y_kmajor: bool, low_rmajor: bool, has_lora: bool,
                    has_bias: bool, has_keep: bool, rank_block: int, num_programs: int,
                    config: dict | None = None) -> dict:
    """_lora_gemm_ptr_kernel compiled for one GPU architecture (capability 90 for sm_90) and one set of flags: the
    cubin and what a launcher needs (entry name, tile BM×BN, dynamic shared memory, threads, Triton's scratch bytes a
    program and their alignment, parameter kinds). Arguments, in order: x, y, h, low, out, bias, keep pointers (16-byte
    aligned; any valid pointer where a flag leaves one out), M, N, K, R, keep_stride (int32), keep_scale (fp32)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _fitting_config(config, rank_block, has_keep)
    element = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    signature = {name: element for name in ("x_ptr", "y_ptr", "h_ptr", "l_ptr", "out_ptr", "bias_ptr")}
    signature.update({"keep_ptr": "*u8", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "keep_stride": "i32",
                      "keep_scale": "fp32"})
    constexprs = {"Y_KMAJOR": y_kmajor, "L_RMAJOR": low_rmajor, "HAS_LORA": has_lora, "HAS_BIAS": has_bias,
                  "HAS_KEEP": has_keep, "BM": cfg["BM"], "BN": cfg["BN"], "BK": cfg["BK"], "BR": rank_block,
                  "GROUP_M": cfg["GROUP_M"], "NUM_PROGRAMS": num_programs, "FLATTEN": cfg.get("FLATTEN", False),
                  "WARP_SPECIALIZE": cfg.get("WARP_SPECIALIZE", False)}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}  # the pointers: 16-byte aligned, as TMA needs
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    try:
        compiled = triton.compile(ASTSource(fn=_lora_gemm_ptr_kernel, signature=signature, constexprs=constexprs,
                                            attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    except Exception:  # noqa: BLE001 - e.g. another Triton's ASTSource form: the JIT's own path, if there is a GPU
        # Small tensors of the same dtypes stand for the arguments; the integers are 17 so that the JIT assumes
        # nothing of them (1 would become a constant, multiples of 16 an alignment) for the sizes the kernel will see.
        if not torch.cuda.is_available():
            raise
        t = torch.empty(64, device="cuda", dtype=dtype)
        u8 = torch.empty(64, device="cuda", dtype=torch.uint8)
        compiled = _lora_gemm_ptr_kernel.warmup(t, t, t, t, t, t, u8, 17, 17, 17, 17, 17, 1.0, grid=(1,),
                                                **constexprs, **options)
    meta = compiled.metadata
    kinds = _param_kinds(compiled.asm["ptx"], meta.name)
    if kinds[:USER_PARAMS] != "ppppppp" + "iiiii" + "f" or set(kinds[USER_PARAMS:]) - {"p"}:
        raise RuntimeError(f"{meta.name}: unexpected parameter layout {kinds!r} for this Triton build")
    return {"cubin": compiled.asm["cubin"], "name": meta.name, "BM": cfg["BM"], "BN": cfg["BN"],
            "shared": meta.shared, "num_warps": meta.num_warps,
            "scratch_bytes": getattr(meta, "global_scratch_size", 0),
            "scratch_align": getattr(meta, "global_scratch_align", 1), "kinds": kinds,
            "ptx": compiled.asm["ptx"]}  # (the tests ask ptxas about its registers)


class CppLoraGemm:
    """lora_gemm launched by peft_fast._C (csrc/triton_launch.h) instead of Triton's Python launcher: compiled once
    for this GPU and these flags, then each call is one C++ launch. For tests and probes until the C++ node calls it."""

    def __init__(self, ext, device: torch.device, dtype: torch.dtype, *, y_kmajor: bool, low_rmajor: bool = False,
                 has_lora: bool = False, has_bias: bool = False, has_keep: bool = False, rank: int = 16,
                 config: dict | None = None):
        major, minor = torch.cuda.get_device_capability(device)
        self.num_programs = torch.cuda.get_device_properties(device).multi_processor_count
        self.flags = dict(y_kmajor=y_kmajor, low_rmajor=low_rmajor, has_lora=has_lora, has_bias=has_bias,
                          has_keep=has_keep)
        built = compile_for_cpp(dtype=dtype, capability=10 * major + minor, rank_block=_block_r(rank),
                                num_programs=self.num_programs, config=config, **self.flags)
        self.tile = built["BM"], built["BN"]
        self.ext = ext
        self.id = ext.triton_kernel_register(built["cubin"], built["name"], built["shared"], built["num_warps"],
                                             built["scratch_bytes"], built["scratch_align"], built["kinds"],
                                             USER_PARAMS)

    def __call__(self, x, y, out, h=None, low=None, bias=None, keep=None, p: float = 0.0):
        m, k = x.shape
        n = out.shape[1]
        r = h.shape[1] if h is not None else 0
        tiles = triton.cdiv(m, self.tile[0]) * triton.cdiv(n, self.tile[1])
        args = [x, y, h if h is not None else x, low if low is not None else x, out,
                bias if bias is not None else out, keep if keep is not None else out, m, n, k, r, n // 8,
                1.0 / (1.0 - p) if keep is not None else 1.0]
        self.ext.triton_kernel_launch(self.id, min(self.num_programs, tiles), args)
        return out


def register_for_node(ext, device: torch.device, dtype: torch.dtype = torch.bfloat16, ranks=(16,), kn=(False,),
                      config: dict | None = None, dx_dropout: bool = True) -> dict:
    """Compile the node's one-GEMM route kernels for this GPU and register them with peft_fast._C
    (lora_kernels_register_tma): per rank block and weight layout (kn: Conv1D's K×N weight), the forward with and
    without bias and dx with and without dropout bits (dx_dropout=False: without, and a dx with dropout takes the
    default route, its kernel unregistered). The route itself stays off until `ext.lora_kernels_set_tma_rows(rows)`.
    Returns the kernel ids registered, by (rank block, kn, dx, bias or keep bits). `config`: one tile config for
    all (None: each kernel's default, KEEP_CONFIG for dx with keep bits)."""
    major, minor = torch.cuda.get_device_capability(device)
    programs = torch.cuda.get_device_properties(device).multi_processor_count
    registered = {}
    for rank in ranks:
        block = _block_r(rank)
        for layout in kn:
            for dx, flag in ((False, False), (False, True), (True, False), (True, True)):
                if dx and flag and not dx_dropout:
                    ext.lora_kernels_register_tma(True, dtype == torch.bfloat16, layout, False, True, block, -1, 0, 0,
                                                  0)
                    continue
                # (forward reads W as stored, N×K: k-major; dx reads it as K×N rows; Conv1D's K×N the other way)
                y_kmajor = layout if dx else not layout
                built = compile_for_cpp(dtype=dtype, capability=10 * major + minor, y_kmajor=y_kmajor, low_rmajor=dx,
                                        has_lora=True, has_bias=flag and not dx, has_keep=flag and dx,
                                        rank_block=block, num_programs=programs, config=config)
                kernel = ext.triton_kernel_register(built["cubin"], built["name"], built["shared"], built["num_warps"],
                                                    built["scratch_bytes"], built["scratch_align"], built["kinds"],
                                                    USER_PARAMS)
                ext.lora_kernels_register_tma(dx, dtype == torch.bfloat16, layout, flag and not dx, flag and dx, block,
                                              kernel, programs, built["BM"], built["BN"], major)
                registered[block, layout, dx, flag] = kernel
    return registered
