"""``import fedjax_bn`` stays light: heavy optional libraries load only where they are used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "sklearn",
    "tensorflow_datasets",
    "matplotlib",
    "ml_collections",
    "orbax",
    "dp_accounting",
)


def test_import_fedjax_bn_loads_no_heavy_optional_library() -> None:
    code = (
        "import sys, fedjax_bn, fedjax_bn.data, fedjax_bn.interop; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_loading_digits_imports_scikit_learn_on_demand() -> None:
    code = (
        "import sys; from fedjax_bn.data import load_digits; load_digits(); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
