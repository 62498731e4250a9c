"""kernels/lora_gemm_tma.py (one TMA GEMM with the LoRA term inside it, the node's one-GEMM route) against its
fp32 torch reference: in Triton's interpreter on the CPU at small odd shapes, and on a Hopper GPU at real sizes in
bf16 (`-m gpu`)."""

import os

import pytest
import torch

from peft_fast.kernels import lora_gemm_tma as G

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
SMALL = {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2, "num_stages": 2, "num_warps": 4}


def _operands(m, n, k, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    def adapter(*shape, scale):  # (fp32, as PEFT keeps adapters by default)
        return torch.randn(*shape, generator=g, device=device) * scale
    return {"x": rand(m, k), "w": rand(n, k, scale=k**-0.5), "w_t": rand(k, n, scale=k**-0.5), "h": rand(m, r),
            "b": rand(n, r, scale=r**-0.5), "a": rand(r, n, scale=r**-0.5), "bias": rand(n),
            "keep": torch.randint(0, 256, (m, n // 8), dtype=torch.uint8, generator=g, device=device),
            "shrink_a": adapter(r, k, scale=k**-0.5), "shrink_b": adapter(k, r, scale=k**-0.5),
            "b32": adapter(n, r, scale=r**-0.5), "a32": adapter(r, n, scale=r**-0.5)}


def _check(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < tol, err


CASES = [  # (what, kwargs builder): the forward form, dx with dropout bits, and the plain GEMM
    ("forward", lambda o: dict(x=o["x"], y=o["w"], y_kmajor=True, h=o["h"], low=o["b"], bias=o["bias"])),
    ("dx with dropout", lambda o: dict(x=o["x"], y=o["w_t"], y_kmajor=False, h=o["h"], low=o["a"], low_rmajor=True,
                                       keep=o["keep"], p=0.25)),
    ("dx", lambda o: dict(x=o["x"], y=o["w_t"], y_kmajor=False, h=o["h"], low=o["a"], low_rmajor=True)),
    ("plain", lambda o: dict(x=o["x"], y=o["w"], y_kmajor=True)),
    # h made by the kernel from fp32 adapters: the forward's h = s·x·Aᵀ (A stored r×K), dx's gs = s·dy·B (B K×r here)
    ("forward producing h", lambda o: dict(x=o["x"], y=o["w"], y_kmajor=True, low=o["b32"], bias=o["bias"],
                                           src=o["shrink_a"], src_rmajor=True, h_scale=1.5)),
    ("dx producing h", lambda o: dict(x=o["x"], y=o["w_t"], y_kmajor=False, low=o["a32"], low_rmajor=True,
                                      src=o["shrink_b"], src_rmajor=False, h_scale=0.75)),
]

PRODUCING = [case for case in CASES if "producing" in case[0]]


@pytest.mark.skipif(not INTERPRETER, reason="interpreter tests (CPU tensors); the gpu-marked test covers the GPU")
@pytest.mark.parametrize("what,build", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m,n,k,r", [(40, 48, 40, 16), (33, 24, 56, 8)])
def test_lora_gemm_matches_reference_in_the_interpreter(what, build, m, n, k, r):
    args = build(_operands(m, n, k, r, torch.float32, "cpu"))
    _check_with_h(args, config=SMALL)


def _check_with_h(args, **launch):
    """out against the reference, and a produced h against reference_h (to the dtype's accuracy)."""
    out, h = G.lora_gemm_h(**args, **launch)
    dtype = args["x"].dtype
    _check(out, G.reference(**args), dtype)
    if "src" in args:
        _check(h, G.reference_h(args["x"], args["src"], src_rmajor=args["src_rmajor"], h_scale=args["h_scale"]),
               dtype)


@pytest.mark.skipif(not INTERPRETER, reason="interpreter tests")
@pytest.mark.parametrize("early_h", [False, True])
def test_produced_h_reaches_every_column_block(early_h):
    """Several column blocks a row block: the tiles after the producer use its h (a wrong or missing h shows in their
    columns of the output, not in column block 0's), asked for after their K loop or, EARLY_H, before it."""
    o = _operands(48, 80, 32, 8, torch.float32, "cpu", seed=4)
    args = dict(x=o["x"], y=o["w"], y_kmajor=True, low=o["b32"], src=o["shrink_a"], src_rmajor=True, h_scale=2.0)
    out, _ = G.lora_gemm_h(**args, config={**SMALL, "EARLY_H": early_h})
    want = G.reference(**args)
    plain = G.reference(**{**args, "src": None, "low": None})
    assert (want[:, 16:] - plain[:, 16:]).abs().max() > 0.1  # the term is a clear share of those columns
    _check(out[:, 16:], want[:, 16:], torch.float32)


@pytest.mark.skipif(not INTERPRETER, reason="interpreter tests")
@pytest.mark.parametrize("what,build", PRODUCING, ids=[c[0] for c in PRODUCING])
def test_producing_kernels_with_h_asked_early_match_the_reference(what, build):
    """EARLY_H: the producing kernels' other tiles take h before their K loop once its producers are done (in the
    interpreter's one program, always: the producers come first), forward and dx, odd sizes."""
    _check_with_h(build(_operands(33, 40, 56, 8, torch.float32, "cpu", seed=5)), config={**SMALL, "EARLY_H": True})


@pytest.mark.skipif(not INTERPRETER, reason="interpreter tests")
def test_lora_gemm_refuses_mismatched_operands():
    o = _operands(40, 48, 40, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="h and low come together"):
        G.lora_gemm(o["x"], o["w"], y_kmajor=True, h=o["h"], config=SMALL)
    with pytest.raises(ValueError, match="x is"):
        G.lora_gemm(o["x"], o["w_t"], y_kmajor=True, config=SMALL)
    with pytest.raises(ValueError, match="src is"):  # A for the forward is r×K: given as K×r
        G.lora_gemm(o["x"], o["w"], y_kmajor=True, low=o["b32"], src=o["shrink_b"], src_rmajor=True, config=SMALL)
    with pytest.raises(ValueError, match="without keep bits"):
        G.lora_gemm(o["x"], o["w"], y_kmajor=True, low=o["b32"], src=o["shrink_a"], src_rmajor=True,
                    keep=o["keep"], config=SMALL)


def test_producers_a_row_block_fit_the_first_round():
    """How many column blocks share a row block's h (producer_splits): as many as the grid's programs allow for every
    row block at once (all producers in the first round: they wait on one another), at most MAX_SPLITS, the column
    blocks and the K steps; one where the row blocks fill half the grid or more. Their scratch: a 16-byte run of
    counters, then the fp32 partial sums."""
    splits = G.producer_splits
    assert splits(2048, 4096, 4096, 128, 256, 64, 132) == 8  # 16 row blocks: 8 producers each, 128 programs busy
    assert splits(8192, 4096, 4096, 128, 256, 64, 132) == 2  # 64 row blocks
    assert splits(16384, 4096, 4096, 128, 256, 64, 132) == 1  # 128 row blocks: one producer each, as before
    assert splits(32768, 4096, 4096, 128, 256, 64, 132) == 1  # more row blocks than programs
    assert splits(2048, 512, 4096, 128, 256, 64, 132) == 2  # two column blocks
    assert splits(2048, 4096, 128, 128, 256, 64, 132) == 2  # two K steps
    assert splits(2048, 4096, 4096, 128, 256, 64, 132, max_splits=1) == 1
    for m in (1, 2048, 2000, 8192):
        for n, k in ((4096, 4096), (512, 128)):
            s = splits(m, n, k, 128, 256, 64, 132)
            num_m = -(-m // 128)
            assert 1 <= s and (s == 1 or num_m * s <= 132)
            counters, total = G.producer_scratch_words(m, 128, 16, s)
            assert counters % 4 == 0 and counters >= num_m
            assert total == counters + (num_m * s * 128 * 16 if s > 1 else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(2048, 4096, 4096), (2000, 1536, 200), (640, 2048, 1024)])
@pytest.mark.parametrize("dx", [False, True])
def test_producers_split_over_column_blocks_make_the_same_h(m, n, k, dx):
    """Several producers a row block (each a slice of the K steps, their fp32 parts summed in order by every tile)
    give the reference's out and h, as one producer a row block does; K steps fewer than the producers included."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need a Hopper (sm_90+) GPU")
    o = _operands(m, n, k, 16, torch.bfloat16, "cuda", seed=7)
    if dx:  # dx's form: out = dy·W + gs·A, gs = s·dy·B (B K×r)
        args = dict(x=o["x"], y=o["w_t"], y_kmajor=False, low=o["a32"], low_rmajor=True, src=o["shrink_b"],
                    src_rmajor=False, h_scale=0.75)
    else:
        args = dict(x=o["x"], y=o["w"], y_kmajor=True, low=o["b32"], bias=o["bias"], src=o["shrink_a"],
                    src_rmajor=True, h_scale=1.5)
    cfg = G.DEFAULT_CONFIG
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    assert G.producer_splits(m, n, k, cfg["BM"], cfg["BN"], cfg["BK"], programs) > 1
    _check_with_h(args)
    _check_with_h(args, max_splits=1)
    _check_with_h(args, config={**cfg, "EARLY_H": True})  # (the first round's other tiles still wait after the loop)


@pytest.mark.gpu
@pytest.mark.parametrize("what,build", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("m,n,k,r", [(8192, 4096, 4096, 16), (777, 3000, 1024, 64)])
def test_lora_gemm_matches_reference_on_hopper(what, build, m, n, k, r):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need a Hopper (sm_90+) GPU")
    args = build(_operands(m, n, k, r, torch.bfloat16, "cuda"))
    _check_with_h(args)


_AOT = """
import json, torch
from peft_fast.kernels import lora_gemm_tma as G
built = G.compile_for_cpp(dtype=torch.bfloat16, capability=90, y_kmajor=False, low_rmajor=True, has_lora=True,
                          has_bias=False, has_keep=True, rank_block=16, num_programs=132,
                          config={**G.DEFAULT_CONFIG, "BN": 128})
print(json.dumps({**built, "cubin": built["cubin"][:4].hex(), "user": G.USER_PARAMS}))
"""


def test_compiles_ahead_of_time_for_hopper_with_the_parameter_layout_the_cpp_launcher_expects():
    """compile_for_cpp needs no GPU (Triton's bundled ptxas), but the compiler, not the interpreter: in a child
    process without TRITON_INTERPRET. The cubin, its entry and its parameter kinds as csrc/triton_launch.h reads
    them."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    assert built["cubin"] == "7f454c46" and built["name"] == "_lora_gemm_ptr_kernel"  # an ELF cubin
    kinds, user = built["kinds"], built["user"]
    assert kinds.startswith("p" * 9 + "i" * 5 + "ff") and len(kinds) > user and set(kinds[user:]) == {"p"}
    assert built["scratch_bytes"] >= 3 * 128  # three device-made TMA descriptors a program (x, W, out)
    assert built["shared"] > 48 * 1024 and built["num_warps"] == 8


_FIT = """
import json, torch
from peft_fast.kernels import lora_gemm_tma as G
# rank block 64, producing from fp32 adapters, 128×128 tiles at 4 stages: _fitting_config's estimate (229,376 bytes)
# keeps 4 stages, the compiled kernel asks 237,624
narrow = {**G.DEFAULT_CONFIG, "BN": 128, "num_stages": 4}
built = G.compile_for_cpp(dtype=torch.bfloat16, capability=90, y_kmajor=True, low_rmajor=False, has_lora=True,
                          has_bias=False, has_keep=False, rank_block=64, num_programs=132, produce_h=True,
                          adapter_dtype=torch.float32, config=narrow)
try:  # a GPU with ~99 KiB a block (consumer Blackwell): the default tiles do not fit at any depth
    G.compile_for_cpp(dtype=torch.bfloat16, capability=90, y_kmajor=True, low_rmajor=False, has_lora=True,
                      has_bias=False, has_keep=False, rank_block=16, num_programs=132, shared_limit=101376)
    error = ""
except RuntimeError as err:
    error = str(err)
# the route's default producing forward (rank block 16, fp32 adapters: the largest default kernel) keeps the three
# stages it was measured with
default = G.compile_for_cpp(dtype=torch.bfloat16, capability=90, y_kmajor=True, low_rmajor=False, has_lora=True,
                            has_bias=False, has_keep=False, rank_block=16, num_programs=132, produce_h=True,
                            adapter_dtype=torch.float32)
print(json.dumps({"stages": built["num_stages"], "shared": built["shared"], "error": error,
                  "default_stages": default["num_stages"], "default_shared": default["shared"]}))
"""


def test_compiled_kernels_fit_the_gpus_shared_memory():
    """compile_for_cpp checks the compiled kernel's shared memory, not only _fitting_config's estimate: a pipeline the
    estimate lets through but the compiler makes larger loses a stage until it fits the limit (a kernel over it would
    fail at its first launch, inside the node's forward); where even two stages do not fit (another GPU's smaller
    limit) it raises, naming the bytes; the route's largest default kernel keeps its measured three stages. In a
    child process without TRITON_INTERPRET, like the test above."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _FIT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["stages"] < 4 and got["shared"] <= G.HOPPER_SHARED_BYTES, got
    assert "shared memory" in got["error"] and "101376" in got["error"], got
    assert got["default_stages"] == 3 and got["default_shared"] <= G.HOPPER_SHARED_BYTES, got  # (as measured)


_PTXAS = """
import subprocess, sys, tempfile, torch
from triton import knobs
from peft_fast.kernels import lora_gemm_tma as G
# the route's dx kernels at their default configs, then the producing forward and dx (fp32 adapters), those also
# with EARLY_H
for keep, produce, dx, early in ((False, False, True, False), (True, False, True, False), (False, True, False, False),
                                 (False, True, True, False), (False, True, False, True), (False, True, True, True)):
    built = G.compile_for_cpp(dtype=torch.bfloat16, capability=90, y_kmajor=not dx, low_rmajor=dx, has_lora=True,
                              has_bias=False, has_keep=keep, rank_block=16, num_programs=132, produce_h=produce,
                              adapter_dtype=torch.float32 if produce else None,
                              config={**G.DEFAULT_CONFIG, "EARLY_H": True} if early else None)
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(built["ptx"])
        run = subprocess.run([knobs.nvidia.ptxas.path, "-v", "-arch=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                             capture_output=True, text=True, check=True)
    print(keep, produce, dx, early, [line for line in run.stderr.splitlines() if "spill" in line][0])
"""


def test_dx_kernels_keep_their_accumulator_in_registers():
    """The dx kernel with dropout bits at KEEP_CONFIG (128×256) spills at most 128 bytes (ptxas -v for sm_90a, no GPU
    needed): its expanded bits sit beside the fp32 accumulator (96 bytes spill, measured faster than 128×128 tiles
    without); per-element loads spilled 236 bytes and ran 1.8× the plain GEMM's time. The plain dx kernel spills
    nothing, nor do the producing ones (whose adapter tiles come by TMA: loaded by element, dx's spilled 24 bytes),
    h asked for early (EARLY_H) or not."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PTXAS], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 6, lines
    # (keep, produce, dx, early) → bytes spilled
    spills = {tuple(line.split()[:4]): int(line.split(",")[1].split()[0]) for line in lines}
    assert spills.pop(("True", "False", "True", "False")) <= 128 and set(spills.values()) == {0}, lines


@pytest.mark.gpu
@pytest.mark.parametrize("what,build", CASES, ids=[c[0] for c in CASES])
def test_cpp_launch_equals_the_python_launch(what, build):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need a Hopper (sm_90+) GPU")
    from peft_fast.ops.extension import _C

    if _C is None or not hasattr(_C, "triton_kernel_register"):
        pytest.skip("peft_fast._C is not built")
    args = build(_operands(4096, 3072, 1024, 16, torch.bfloat16, "cuda", seed=2))
    produce = "src" in args
    launcher = G.CppLoraGemm(_C, torch.device("cuda"), torch.bfloat16, y_kmajor=args["y_kmajor"],
                             low_rmajor=args.get("low_rmajor", False), has_lora="h" in args or produce,
                             has_bias="bias" in args, has_keep="keep" in args, produce_h=produce,
                             adapter_dtype=args["low"].dtype if produce else None)
    want, want_h = G.lora_gemm_h(**args)
    h = torch.empty_like(want_h) if produce else args.get("h")
    got = launcher(args["x"], args["y"], torch.empty_like(want), h=h, low=args.get("low"), bias=args.get("bias"),
                   keep=args.get("keep"), p=args.get("p", 0.0), src=args.get("src"), h_scale=args.get("h_scale", 1.0))
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    if produce:
        assert torch.equal(h, want_h)
