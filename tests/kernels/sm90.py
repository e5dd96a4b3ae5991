"""Compile Triton kernels for sm_90 (H100/H200) on a machine without a GPU: Triton ships ptxas and
cuobjdump. Runs in a subprocess because the test process decorated every kernel for the interpreter."""
import json
import subprocess
import sys

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile, importlib, collections
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
out = []
for spec in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    signature = {n: spec["signature"].get(n, "constexpr") for n in names}
    constexprs = {(names.index(n),): v for n, v in spec["constexprs"].items()}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.get("aligned", [])}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)})
    except Exception as e:  # report it against this spec; the others still compile
        out.append(dict(error=(str(e).strip().splitlines() or [repr(e)])[-1][:500]))
        continue
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"]); f.flush()
        res = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", res.stdout)
    out.append(dict(
        global_ops=collections.Counter(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)),
        registers=int(usage.group(1)) if usage else None, stack=int(usage.group(2)) if usage else None))
print(json.dumps(out))
"""


def compile_sm90(specs: list[dict]) -> list[dict]:
    """For each spec {module, kernel, signature: {arg: "*bf16" | "i32" | "fp32"}, constexprs: {arg: value},
    aligned: [args], num_warps, num_stages}: the global load/store instruction counts, registers and stack bytes,
    or {error: the compiler's message}."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(specs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
