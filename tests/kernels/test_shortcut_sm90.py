"""The shortcut kernels compile for sm_90 and move data with 16-byte vector loads/stores, spill-free."""
import pytest


pytest.importorskip("triton.backends.nvidia")


def spec(kernel, dtype, scalar="fp32", **constexprs):
    ptrs = {name: f"*{dtype}" for name in ("x_ptr", "res_ptr", "y_ptr")}
    return dict(module="dcae_kernels.shortcut", kernel=kernel, num_warps=8,
                signature=dict(ptrs, HL="i32", WL="i32", scale=scalar), aligned=[*ptrs, "HL", "WL"],
                constexprs=dict(FP64=dtype == "fp64", BLOCK=4096, **constexprs))


# DC-AE's cases (f = 2; G or R = 2 and 4) with the fused add, in bf16, plus a general and an fp64 case.
SM90 = {
    "down G2 +add": spec("space_to_channel_avg_kernel", "bf16", F=2, FP=2, GROUP=2, NC=1, NR=1, BW=256,
                         HAS_RES=True),
    "down G4 +add": spec("space_to_channel_avg_kernel", "bf16", F=2, FP=2, GROUP=4, NC=1, NR=2, BW=256,
                         HAS_RES=True),
    "up R2 +add": spec("channel_to_space_dup_kernel", "bf16", F=2, FP=2, GROUP=2, NC=1, NR=1, BW=256,
                       HAS_RES=True),
    "up R4 +add": spec("channel_to_space_dup_kernel", "bf16", F=2, FP=2, GROUP=4, NC=1, NR=2, BW=256,
                       HAS_RES=True),
    "down f3 G1": spec("space_to_channel_avg_kernel", "fp32", F=3, FP=4, GROUP=1, NC=3, NR=1, BW=32,
                       HAS_RES=False),
    # torch.compile (Inductor) passes the Python float `scale` as an fp64 scalar
    "down G2 +add, fp64 scale (Inductor)": spec("space_to_channel_avg_kernel", "bf16", "fp64", F=2, FP=2, GROUP=2,
                                                NC=1, NR=1, BW=256, HAS_RES=True),
    "up R2 +add, fp64 scale (Inductor)": spec("channel_to_space_dup_kernel", "bf16", "fp64", F=2, FP=2, GROUP=2,
                                              NC=1, NR=1, BW=256, HAS_RES=True),
    "up f4 R1 fp64": spec("channel_to_space_dup_kernel", "fp64", F=4, FP=4, GROUP=1, NC=4, NR=1, BW=64,
                          HAS_RES=True),
}


@pytest.mark.parametrize("name", list(SM90))
def test_compiles_without_spills(sm90, name):
    assert "error" not in sm90[name] and sm90[name]["stack"] == 0, sm90[name]


@pytest.mark.parametrize("name", [n for n in SM90 if "+add" in n])
def test_dcae_cases_use_16_byte_accesses(sm90, name):
    ops = sm90[name].get("global_ops")
    assert ops and all(".v4.b32" in op for op in ops), ops
