"""tokenspeed_core is the contract: importing it (and every op family) pulls in no engine module,
neither triton nor cutlass."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import tokenspeed_core, tokenspeed_core.ops, tokenspeed_core.testing, tokenspeed_core.bench
for spec in tokenspeed_core.ops.all_specs():
    pass
bad = sorted(m for m in sys.modules
             if m == "tokenspeed" or m.startswith("tokenspeed.") or m.split(".")[0] in ("triton", "cutlass"))
print(",".join(bad))
"""


def test_core_imports_no_engine_triton_or_cutlass():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "", f"tokenspeed_core imported: {r.stdout.strip()}"
