"""Triton ``sample`` v3 on the GPU in one process (one device call, ~2.5-3.5 minutes).

1. copy / bf16 GEMM ceilings, measured in this run;
2. correctness: the conformance kit's "full" grid with the registered kernel (split-row for
   B <= SPLIT_MAX_B, a program per row above), then the full-grid cases with B <= 64 forced onto
   the split-row path and the B = 1 cases forced onto the row path, so both paths meet real shapes;
3. timing (bf16, V = 129280) of v2 (the kernel of commit 66b8268, embedded below), v3 with the
   one-program-per-row path forced ("v3-row": v2's structure with v3's per-logit math and the next
   block's load issued before the current block's work; "v3-row-nopf" without that) and v3 as
   registered ("v3": split-row at B <= 32), each by CUDA events (L2 flushed, 4 input sets rotated)
   and by CUDA-graph replay; every timed kernel's output on set 0 is checked with the spec's compare.
   Rows: the v2 log's table (B=256 mixed/filters/plain, B=1 filters/plain/mixed) plus B=4 and B=16
   filters, then per-filter rows (top-k / top-p / min-p alone) at B=1 and B=256.

    PYTHONUNBUFFERED=1 python bench/gpu_sample.py --out $OUT [--no-check] [--iters 20]

Registers the Triton plugin by hand (the device machine may lack cffi for an editable install):
put the repo root and tokenspeed_kernels_triton/src on PYTHONPATH (done below as well).
Writes check-sample.txt and sample.json under --out; prints a short table last.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
import tempfile
import time
import zlib

if "--smoke" in sys.argv:  # CPU interpreter run of this script (tests the script, not the GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tokenspeed_kernels_triton", "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import tokenspeed_core  # noqa: E402
from tokenspeed_core.bench import get_ceilings  # noqa: E402
from tokenspeed_core.bench._timing import time_calls  # noqa: E402
from tokenspeed_core.testing import check_backend, run_case  # noqa: E402

T0 = time.time()
ROTATE = 4  # input sets per case: 4 x 66 MB > the 50 MB L2 at B=256
TIME_BUDGET_S = 210  # per-filter diagnostic rows are skipped past this (one call must stay < 4 min)
# tokenspeed_kernels_triton/src/tokenspeed_kernels_triton/sample.py at commit 66b8268 (v2),
# zlib + base64 (sha256 of the source starts 40a8520071591a57): the baseline runs in the same call.
V2_SOURCE = (
    "eNrdW3lzG8eV/x+foheq8g6oAQSChyhIYK3o0I4rju2KGCUplTwczDSACebSHCQox/ns+b33ek6Cksxka6uW5TKAme53390a"
    "DodXWVAksbq+zt0oDfX19VwVOkp15hZlpm1VJOl4Kx+praIgHqfKjX1VbLTKtfa1r/QuTWIdF4Ebqsz1sCmIFZ6orc5iHU4G"
    "gx/xI82SdeZGCqBVlty+VPpGZ3fK116QB6AgyFXhbnVcLQAERuLrm8DTyooTtUnyQuV3sWcrgEo3Y89NQaW7DPVoMrhkeKsg"
    "LABgq3Wag1BVpgQv14VKVgwvTNZBkSvrg1oQ5Za1U2MVjdQzdTUiIqIkTgqiHkzsRrbKE6Vdb0Ov3EGxyXS+SUK/oi7JfJ2N"
    "UzzV2U0Qr7Gr0Gsm4I4w7pR1eKqWhHGVZGq5Ojy11dFMJdic3Qa5BoZKnFudFgOilESB30UCceTqFmxrhueF2s1ARhiqmpB8"
    "oq6wlgSGbXmRaTeCTkD8xfc/fv0H5W3KeJvPB4PDiYrcHSNbBRkE6WZrPJioPyW3QBIUGwURG/FZhN9LIghDuWvoVnkuaFVZ"
    "KWyTmglHsSGkwDhQSqVuns9FWKHL6icdEOtLDXzWzibhq8sREwHoqQsmlKtifSvMquWdYn3sHNrCSgF+N4jzgjDwdrzmT15i"
    "QzwBEMYwxZwYAEsvRc8gAcAzrSKdrSESZpHesBgK/qpjf6K+zbD5juBnJIoctq7cFYmB2SO2JoPZRFxBWcEKyh/NRWXjgpgF"
    "fDAIFdkwKdcrQnwBKy7k5Ac7WF+ovUIIOBvDGJQfkBHaIixCANsC/uvrIpwAZ8Gucn1d2SwvV2XsM03kS3oFuKsEj8hAVy5U"
    "NmNAum1ox/x9lR7N4B9HwkHa5aBFvCqMrZEN/kIPzheq+FVZRDgpm/gfKbY6CBFE0/skdVJ1gM/CDW1iosO4m4FBZvy4wzih"
    "hmN4sITAdwvN8EA7OSvLg5yBf7EpkcFk2i897ROKJIb5VUsn6js4dxzeGXSa7K241TCnMIGTQ92WqI4V5DKrubvS2LHUIRyH"
    "jYIjm1cWI0JQuSSZCpbPGy3klVsUiVrCi9nC8m2AMOOLKzNxspn0ukxuKOiQd9bYCEVBgi9MHGUxkeEhMAkleB5zcPR1DuUd"
    "Txq/A8CsDhgmSsyNO5PFfBQPsS4RWy7VKksiwZJq77+J/BIhKhsv4dC+2rj5BgGaQgh9JSrJMctCYkiJcIZo5SJJbCJdBF5l"
    "38rNa6AgcxWQswXFBAgXakzYS46m+sYNS+jXH2BD9ZyMslSv1OGzmZF0lpTrDYVrt3BjSEJnAcGL1Q3AHYKfUgTJ4ZiUkOnQ"
    "LQJI1vU8ZADvbuAnmgIATEynmtUAS70172Fg19fADpcCUTHkDajWT1d/hUDcFKlpF0S0iAIL5MCULPMkhBxsAjqo8MFlsyxh"
    "8VN2rOzkNohjjdBs/JXVRIZRSasdzskZSkMDNDscDgcDVpLjrEpKuo6jgihNMoToGLiBN4nzwcA8KxLYSv2Ds3f31wQesy4R"
    "tVlHoQEu2FNEOsdLMj2BqU0k5VfIvv/x2++unN9d/e2nyzeDAWcP54+v/0oKmM6OBz/8+Y/OX17/6ac3eHA2GAz+x2D7e1AM"
    "YADKWUXB7mhm7UZzMm/1REVlhv+OkFNiN0Sqy0gnxqKsqAyLIA0DT9hTt0joyL2+mv18NIOaN8GqkPBNCdtzQ/ZL5NOfF/jf"
    "+Tmih3lwsFDT3dnJ5cXXr08v+ouO2ou+nl3MXl8eneyHlGkIHzl/H29IDA7igEUVjw0trxAiDZ/Q31XjXQhKY8rFFGNY7mD3"
    "9JgrJQkOvJXza5ChEOCguHHDG/JyMgUCuYGIkQhWZRha797boHx2fPTN6euzM5ueiwhH9dJK8hv1MyOaFInVLBuppwDw4vLo"
    "+fMXFy/2bmK2SBKUJ37rZuHot+M0kvhCrEY5m73KgWCTyKEiywp8VBmbRjX00Akqv+RoRdFHjPAm8dxliQx4hwc+qswcUQIQ"
    "ECU44Rg9Xl9vrq9r5QRgBGu6FLdprLisPgNkx4YbsLYZgf/NaB8rrVLaItIbRlpx1Ub4WCiLF5D8zlhekxMql2Y/z46pWkea"
    "W6GqKsO0CZWcN6h4hDSsqU3Rp2JqSwAbeIa5VZi4xB05M0eyuZodczHLm5iKbYX7QJ1MXpxOj0+Pj58/Pzl6MT2dnejx9Kze"
    "zILfIuyDRnHLG2bj8PT58+ezw9PJFHEe9cX48/A4I9gdsChFarhPRFK06mYEHDNJK1YB0RX4fQNBoVzit68Q3p4doWwN1huU"
    "ET7iuc6iXKHUhshArB6/qEXI0BsITPGNKL+YkdNSIcQ/cwqbeP9MHZ5MpvWjnBbMIDLz7ugT7w4ffvfi4VfPH371CUIeoqNt"
    "1zCIW8p6Funw7Ojs7HR6NoEZjfGiMkwSyQGLId9r39wuIQVRLIWj/uHyb86b33/3zdWcoHvIAwU8IGus3mQL8kLOm7TPhdL4"
    "yxIVxmoFS3+lllLoir1S0zWesgs/nSKTUBKRdvQO+ZZB14hJTae8mQoVTUWNS81OpCV8Ux3N1R+iNRVvtNhgYXch2B91lnBh"
    "Yio7QoRUYJbXy5g9Ny6YMD9L0pT6ReyJTKdU95PKgu9SF8xFtFT1ja8uQXM3/NiEBA1asbjKSj2qaJAsIjqzlhxpD0fqv5AJ"
    "bfXPJTapf1DmnMrf3m07tcBy0nKVj3YTCDTVdmtnOynZLOW22XAfcd5IfJ9ZQKI+5ViLilJbcRB/a6ygsT5axStgm7wEBfZ2"
    "gW8wgLe2tNQL1o41HAfxajjqB7J9uDdwfIcgWVxz3LM9elXlD+JF9ClalOL++pp3ImtYU4on/Iu+sDxuAleKgFqBhiPL6ub4"
    "b8wfi5N3wNBfCbSR+qq1opcu93G1LTaOae3Y2USwkNLWlsFA1+O+wBWv9rS7CjEWfFJAeDuqe995p+2lIrnd9TZ9WyUPQn3x"
    "3dWbLmZF8kN8bQyH1npJmIuBukj7a015jPkRmzMtWm/B7ORUXpu+uVddte2Xkker12t32DzWSkOU9gxLdL8PVAtSf4ITVA2h"
    "DL+a9tcMJ2jcwDQyCgpL3AUJJ5Wc1LNnyNFzQuDSRKYIIqqSk7QVR9DaqDxCsmdAHNrZKhe1tCHaM8RpK6dIP6qXkTtQqdZz"
    "Cyw6axZxD2nETNEvt95Bxu9b3NdLmQf0ukXDx5QNUbQ2rxdybeWTcmT5U9Z157UEp04SeSB0tOx51AGBLs8j/iwTNsixLIsA"
    "f8WsjyjgiQq6Gw3LT5nnekRjyV7Et9pNZycnlX9WIRGyMcGK0TeA3cJBnZGTWsQsnhL0vIwsQQff2QX5YkpFEflGGe1797Qi"
    "DgYhLoZiyK+RPGnQrGAQeTMI48UvzR4kzPDWvcvVhxLd2or67yXXxaVHHVoNjmd5LAUerFSZosYB3Igx1ZxnOqrpbLgWVhcV"
    "rzUM43TnSiZ7FZ/7YNSebL78A+UrNnUDYxM+23HXONieoMmzrG64jMjrbxxQs3V4fBQi1W8CW+ZedsdE8Pf40Nqbw5GKaH5k"
    "VWM4W3WncK3RG6+TxxCaS5MoSlCbwBQ7b2Qs5suQDCDeCRPv56if9k+q3DDTrt+ej8m4ioI50YegHyamYKhCTs5FE/X6PEA0"
    "cyx5HydE+9rAC5NRVS91Z188VXlUXvjhzdXrby/vrWyHzOPHJ5BDkz8QmaCk/lvBPTKth1kjMV9cCzKlamETmGKUhtU0q6Ys"
    "KHCnqvYGy8Jy9IfBiMKK1QrXxxyuBTzF7F4ZwKVaP/S0/ab2GRDyVTvC93DkZj2SecApDuS9Mlzuy0t5I4P5p9LN8Z50Qxmw"
    "48WigE/6sdDmddIPq5AUJUmoLviq9Tyevr/jgdXsCg5Pj79sw/4s1wRHT2aHbyWYPSL10csHct3nUuTuwWT4Qfhrn4IdSLjb"
    "u850Eu3MaaITx0Yw9sGmZqG7WSSPaP+h87gW8dMWbAOOwtM+UKT03vJ3c9gemrv3tI+M6R39stUcivpQv+zBQtQTjXRVYCby"
    "rTMNk5/4aONeCpJyIs8b1wV9+5c9kDPrMxQTWz+VNB+b9BrZGWeuaDXyb8qImpBe24U4HkTYIUgpceztOGSY7MiZryWnrE5a"
    "IP+1zpPNA8h323xN5SvwVF9pHimb+wmW/mRyaIAnZSFf4Fs0pc1Bl6/37ntEcqYRIIvMnF47gW8ZpXAjulANo3BbLG/iL/Vv"
    "By2aPpd+ZIzUyEqWcdPbk6BgGtWTu3pZJdf2AjHm7qK0v0hkj9jVrKvV0V4nSqaI3Sb0XMmgaOskscwE8UTiA0cKyT7yUsh5"
    "VQ+XInlcE3BOriobQpcJqnB+RXcACkYyqn6k7R8ESnBxDKsncLW/GUh294bDYRUauO+pJv2VGGpTNGKwawG1zNC8Mzp8IieY"
    "h3M+DeDzy+rknXtKPn1HYa13ynLlfBNYKKF6qLpyuUXA4+g5HegHHopqo6ZO71olpM7I435+ioKH0lirVVt+ZhFzxQqhM/IW"
    "Z3zUJcdfNrMnjPIJvUB+DM3LL8vVCORM1Px/pd380py7JlPbwXKjXTc5BO28uS7M7ijo5ZBdfxkt6rWfkKdTR4S11Tko2HcA"
    "Mupuf1IdCqtLJCMXavrI1yc6dyleKlJHNbSIaURBmq0Oq/xgtQKFdLqNDuEH94cuilt2Vq4jlru6kIBUhHQ8Dbs5sSMd7Dbi"
    "WfbEs9zdW0erevKpDKa1ivFipTk51GGu///aSdSUF9GuWz0gp5uXQdyqPXi0GxEaGZi0t8AEaCSRrR/wsnWbkiWx1PNnetiu"
    "J1n9Pa9vuFs7FB9rBtb3qx8hqGGeN5zviSIdHtfEIq8ls+qwaRN3lWGAQZMaGhY5IdVy4wJIyOOvVbqSwlJyCHkZ+uIpeQdy"
    "wxxl8/miGavwtZnWmK1fpkd7y3SurD83sKQlU9Npy2CRqxJb/BlpJSx97bfLX0qiXRuvEH1+cryXzvRzdLaxp/ewc6vFJHQd"
    "b8VJfX6vmqPJJ/P4iYs8CHlcnomyRnMjGrlo1h5OVEPZe1h2DoGBl8DrLRN5+0YA3evx0XQk55bTQzL5VnnxIEz55LGeu8wt"
    "dhVAOr23oepCK6xUsnf7O4JETUPnmKXXOVTa/e0jrk8ofZk/IrX/X0Xf39QZf6xSWRPCesB02p8id3rh1oO0fmB67Y/ca4lV"
    "dhOE6jS3GsL/KCbyhTn/wQjbJOg1jVfzx2Xi/N46hOpl/mAgX+b/qUhOqL8glFNvWyRYb7pCqcvJkredvowaWDkm03cON8uW"
    "X9ylGk58Tod1nZPHw1OKQ/yeiOD7V5MlE4xXVFag/RF4oVvG3sY0v/a9i9TOtnYqEzu4u6guFOXczdrqgIqWxNsueJTRVkFc"
    "Rs6tm6U5v2oGyN8zXpkauzFdaw4DD8GxCEJNMwK8jNxsm49eti56qzTwtrm5Y71yy7BojuQuIOG6uZUT36oUuOA5Y+OiIiVT"
    "tYNqbJNP+DgZAd1DJV3WF8rs6p5arHfQUnKrMydZOTPrbVW1dmcJ76wLe/T+3xXq270jgbq4Zja5TbfqCd2C+WjFiEXLXswe"
    "MZtPwG5UVn8jydS36SpTFJb/PS5bJwpyq1+Azvn2w73793LVO+/f5pcrpu2797VV/CfMu+KXbpnCOh0ZOeUWu14Y5MW7ogTN"
    "72tWrL/DkFdATKdQABmsY4OyHtbkcqWUmYicF9Tz4/NwOq2wgNS8qNkwKGGo797X82zxb+p2hnRfemirId39oM9Vis/2aDug"
    "QP3LsBn9DOdqNTz4hWH8Slt6Axu8Hx5UYOspDT8N6GHffIb1kKazsx7JdJ7WEwqBd3pMD1vDiebxPTQmTLY3vqUfgUBuZlf8"
    "cC8I9hR6XWuDdtYu033z66A7a80ndFoV+5bVdXlWsw0RV9BbwaMDuxebRWUmJv866hz7GYzG/DK9hq3pzJIv2Z1t7nWzHVJ0"
    "rXKAvJ7UG2oWhkIy2JUvttCRL9oXaRuB5WVK12zzRehGS98lDueMiDjAj4kfRBbET7ebZgcHR3R7rbmEyywN36qopGPcoDA3"
    "GHmKFMTrlmL8xFt0/B+vzY2MsdzIgJPzaeEz+ecAfOJY/3MS+6F/1dNCcXAgsppsEc/W8F15Ra7tOG4YOg751rDn4mQXEkHY"
    "tow82YJFkO8H/wIO0oB1"
)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def build_registry():
    reg = tokenspeed_core.build_registry(entry_points=False)
    from tokenspeed_kernels_triton import plugin

    with reg.registering_as("triton"):
        plugin.tokenspeed_register_kernels(registry=reg)
    return reg


def load_v2():
    src = zlib.decompress(base64.b64decode("".join(V2_SOURCE)))
    path = os.path.join(tempfile.mkdtemp(prefix="sample_v2_"), "_sample_v2.py")
    with open(path, "wb") as f:  # triton.jit reads the source back from the file
        f.write(src)
    spec = importlib.util.spec_from_file_location("_sample_v2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def only_filter(which: str):
    """make_inputs wrapper: the 'filters' draw with every filter but ``which`` turned off."""
    def make(spec, case, gen, device):
        inputs = spec.make_inputs({**case, "mode": "filters"}, gen, device)
        for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
            if name != which:
                inputs[name] = torch.full_like(inputs[name], off)
        return inputs
    return make


def check_forced(reg, spec, kernel, device, cases, split_max_b: int, tag: str) -> list[str]:
    """Run the kit's run_case on ``cases`` with the path forced through SPLIT_MAX_B."""
    impl = reg.backend("sample", "triton")
    saved = kernel.SPLIT_MAX_B
    kernel.SPLIT_MAX_B = split_max_b
    lines = []
    try:
        for case in cases:
            r = run_case(spec, impl, case, device)
            lines.append(f"[{r.status}] {tag} {r.label} seed={r.seed} {r.detail[:300]}")
    finally:
        kernel.SPLIT_MAX_B = saved
    return lines


class StepZeroOnly:
    """Stands in for ``_split_step_kernel``: launches step 0 only (the plain-row work), so a graph of
    memset + step 0 + finish against the full chain prices the launches that plain rows skip."""

    def __init__(self, kern):
        self.kern = kern

    def __getitem__(self, grid):
        run = self.kern[grid]
        at = self.kern.arg_names.index("step")
        return lambda *a, **kw: run(*a, **kw) if a[at] == 0 else None


def node_cost(kernel, spec, device, iters: int) -> dict:
    """B=1 plain, graph replay: the full split chain vs step 0 + finish only (same output)."""
    case = dict(B=1, V=129280, dtype=torch.bfloat16, mode="plain")
    sets = [spec.bind(spec.make_inputs(case, torch.Generator().manual_seed(s), device)) for s in range(ROTATE)]
    full = time_calls([(lambda c=c: kernel.sample(**c.kwargs())) for c in sets], device, iters=iters,
                      cuda_graph=True).median_us
    orig = kernel._split_step_kernel
    kernel._split_step_kernel = StepZeroOnly(orig)
    try:
        out = sets[0].tensors["out"].fill_(-7)
        kernel.sample(**sets[0].kwargs())
        short_ok = spec.compare("out", out.cpu().clone(), kernel_ref(spec, sets[0]), sets[0]) is None
        short = time_calls([(lambda c=c: kernel.sample(**c.kwargs())) for c in sets], device, iters=iters,
                           cuda_graph=True).median_us
    finally:
        kernel._split_step_kernel = orig
    shift = kernel._key_shift(case["dtype"])
    skipped = (32 - shift) // 8 - 1 + (32 - shift) // 4 + 1
    return {"full_us": full, "step0_finish_us": short, "skipped_launches": skipped,
            "us_per_skipped_launch": (full - short) / skipped, "short_chain_correct": short_ok}


def kernel_ref(spec, call):
    ref = torch.empty(call.tensors["out"].shape[0], dtype=torch.int64)
    spec.reference(**{k: v.detach().cpu() for k, v in call.kwargs().items() if k != "out"}, out=ref)
    return ref


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: tests the script")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    reg = build_registry()
    spec = reg.spec("sample")
    from tokenspeed_kernels_triton import sample as kernel

    v2 = load_v2()
    name = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    log(f"device {name} | torch {torch.__version__} | triton {__import__('triton').__version__}")
    ceil = get_ceilings(device, remeasure=not args.smoke)
    log(f"ceilings: copy {ceil.copy_gbps:.0f} GB/s, bf16 GEMM {ceil.gemm_tflops:.0f} TFLOP/s")
    result: dict = {"device": name, "ceilings": {"copy_gbps": ceil.copy_gbps, "gemm_tflops": ceil.gemm_tflops}}
    summary = []
    if not args.no_check:
        size = "small" if args.smoke else "full"
        rep = check_backend("sample", "triton", size=size, device=device, registry=reg)
        lines = [rep.format(verbose=True)]
        summary.append(f"check {size} grid, registered paths: {'PASS' if rep.ok else 'FAIL'} {rep.counts()}")
        log(summary[-1])
        grid = spec.grid(size)
        if time.time() - T0 > 120:  # keep the call under 4 minutes
            grid = [c for c in grid if c["B"] == 1]
            log("time: forced-path checks cut to the B = 1 cases")
        forced = check_forced(reg, spec, kernel, device, [c for c in grid if 1 <= c["B"] <= 64], 1 << 30,
                              "split-forced")
        forced += check_forced(reg, spec, kernel, device, [c for c in grid if c["B"] == 1], 0, "row-forced")
        lines += forced
        ok = all(s.startswith(("[pass]", "[skip]")) for s in forced)
        summary.append(f"check forced paths ({len(forced)} cases): {'PASS' if ok else 'FAIL'}")
        log(summary[-1] + "".join("\n  " + s for s in forced if not s.startswith("[pass]")))
        with open(os.path.join(args.out, "check-sample.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        result["check"] = {"registered": rep.counts(), "registered_ok": rep.ok, "forced": forced}

    V = 512 if args.smoke else 129280
    bf = torch.bfloat16
    cases = [(dict(B=256, V=V, dtype=bf), None), (dict(B=256, V=V, dtype=bf, mode="filters"), None),
             (dict(B=256, V=V, dtype=bf, mode="plain"), None), (dict(B=1, V=V, dtype=bf, mode="filters"), None),
             (dict(B=1, V=V, dtype=bf, mode="plain"), None), (dict(B=1, V=V, dtype=bf), None),
             (dict(B=4, V=V, dtype=bf, mode="filters"), None), (dict(B=16, V=V, dtype=bf, mode="filters"), None)]
    diag = [(dict(B=B, V=V, dtype=bf), f) for B in (1, 256) for f in ("top_k", "top_p", "min_p")]
    if args.smoke:
        cases = [(dict(c, B=min(c["B"], 3)), f) for c, f in cases[3:5]] + [(dict(diag[1][0], B=2), "top_p")]
        diag = []
    impls = [("v2", lambda **kw: v2.sample(**kw)),
             ("v3-row-nopf", lambda **kw: kernel.launch(**kw, path="row", prefetch=False)),
             ("v3-row", lambda **kw: kernel.launch(**kw, path="row")),
             ("v3", lambda **kw: kernel.sample(**kw))]
    methods = [False] if args.smoke else [False, True]
    table = []
    for case, which in cases + diag:
        if which is not None and time.time() - T0 > TIME_BUDGET_S:
            log("time budget reached: per-filter rows skipped")
            break
        make = (lambda c, g, d, which=which: only_filter(which)(spec, c, g, d)) if which else spec.make_inputs
        label = spec.label(case) + (f" {which} only" if which else "")
        sets = [spec.bind(make(case, torch.Generator().manual_seed(s), device)) for s in range(ROTATE)]
        floor_us = spec.cost(sets[0]).bytes / (ceil.copy_gbps * 1e3)
        t_ref = time.time()
        ref = torch.empty(case["B"], dtype=torch.int64)
        spec.reference(**{k: v.detach().cpu() for k, v in sets[0].kwargs().items() if k != "out"}, out=ref)
        outs = {}
        for impl_name, fn in impls:
            out = sets[0].tensors["out"].fill_(-7)
            fn(**sets[0].kwargs())
            if device.type == "cuda":
                torch.cuda.synchronize()
            outs[impl_name] = out.detach().cpu().clone()
            verdict = spec.compare("out", outs[impl_name], ref, sets[0])
            for graph in methods:
                try:
                    t = time_calls([(lambda c=c, fn=fn: fn(**c.kwargs())) for c in sets], device, iters=args.iters,
                                   cuda_graph=graph)
                    us, p10, p90 = t.median_us, t.p10_us, t.p90_us
                    note = "" if verdict is None else f"MISMATCH {verdict[:70]}"
                except Exception as exc:  # a failing variant is a row, not the end of the run
                    us = p10 = p90 = float("nan")
                    note = f"{type(exc).__name__}: {exc}"[:90]
                table.append(dict(impl=impl_name, method="graph" if graph else "events", case=label, us=us,
                                  p10=p10, p90=p90, pct_copy=100.0 * floor_us / us, note=note))
        same = (outs["v3"] == outs["v3-row"]).float().mean().item()
        log(f"timed {label} (reference {time.time() - t_ref:.1f}s incl. timing; v3 == v3-row on {same:.3f} of rows)")
    result["rows"] = table
    if not args.smoke and time.time() - T0 < TIME_BUDGET_S + 10:
        try:
            result["node_cost"] = nc = node_cost(kernel, spec, device, args.iters)
            summary.append(f"B=1 plain graph: full chain {nc['full_us']:.1f} us, memset + step 0 + finish "
                           f"{nc['step0_finish_us']:.1f} us -> {nc['us_per_skipped_launch']:.2f} us per "
                           f"no-op launch ({nc['skipped_launches']}); short chain correct: {nc['short_chain_correct']}")
            log(summary[-1])
        except Exception as exc:  # a diagnostic, not the end of the run
            log(f"node cost failed: {type(exc).__name__}: {exc}")
    with open(os.path.join(args.out, "sample.json"), "w") as f:
        json.dump(result, f, indent=1)

    print("\n".join(summary))
    print(f"{name}: copy {ceil.copy_gbps:.0f} GB/s, GEMM {ceil.gemm_tflops:.0f} TFLOP/s; us = median; "
          f"graph = CUDA-graph replay; v3 = split-row at B <= {kernel.SPLIT_MAX_B}")
    by = {(r["case"], r["impl"], r["method"]): r for r in table}
    labels = list(dict.fromkeys(r["case"] for r in table))
    cols = [("v2", "graph", "v2 gr"), ("v3-row-nopf", "graph", "row-nopf"), ("v3-row", "graph", "v3row gr"),
            ("v3", "graph", "v3 gr"), ("v3", "events", "v3 ev")]
    print(f"{'case':40s}" + "".join(f" {h:>9s}" for _, _, h in cols) + f" {'v2/v3':>6s} {'%copy':>6s} note")
    for lab in labels:
        def us(impl, m, lab=lab):
            r = by.get((lab, impl, m))
            return r["us"] if r else float("nan")
        m_best = "graph" if (lab, "v3", "graph") in by else "events"
        notes = "; ".join(f"{i}: {by[(lab, i, 'events')]['note']}" for i, _, _ in cols[:4]
                          if (lab, i, "events") in by and by[(lab, i, "events")]["note"])
        print(f"{lab[:40]:40s}" + "".join(f" {us(i, m):9.1f}" for i, m, _ in cols)
              + f" {us('v2', m_best) / us('v3', m_best):6.2f} {by[(lab, 'v3', m_best)]['pct_copy']:6.1f} {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
