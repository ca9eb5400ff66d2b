"""Build dist/bluegreen.pyz: a reproducible zipapp of the pure-Python package, standard library only.

Beside each module's source the archive holds its bytecode for the Python that builds it: zipimport has no
`__pycache__`, so without it every start compiles every imported module again (about 0.15 s of a 0.3 s
`--version` on Python 3.11). Another Python finds the magic number wrong and compiles the source, as before:
build with the hosts' Python (`make build PYTHON=python3.9`) to give them the faster start.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "bluegreen"
SHEBANG = b"#!/usr/bin/env python3\n"
# Fixed timestamp and permissions: two builds of one commit are byte-identical.
EPOCH = (1980, 1, 1, 0, 0, 0)
MAIN = b"import sys\nfrom bluegreen.cli import main\nsys.exit(main())\n"


def package_files(src: Path) -> list[Path]:
    """Every file of the package that belongs in the archive, in a stable order."""
    files = []
    for path in sorted((src / PACKAGE).rglob("*")):
        rel = path.relative_to(src)
        # Hidden files are editor or atomic-write leftovers, never part of the product.
        if path.is_dir() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo") or any(part.startswith(".") for part in rel.parts):
            continue
        files.append(path)
    return files


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.create_system = 3  # unix, whatever machine builds it
    zf.writestr(info, data, compresslevel=9)


# Compiles in a fresh interpreter without site (-I -S): marshal marks objects it meets twice by their reference
# counts, so on Python 3.9 and 3.10 the same source compiled in a busier interpreter (more modules imported,
# a .pth file) can give other bytes. In a fresh one, each build does the same and gets the same.
_COMPILER = r"""
import base64, importlib.util, json, sys
from importlib._bootstrap_external import _code_to_hash_pyc  # what py_compile uses; no public API takes bytes
out = {}
for name, path in json.load(sys.stdin):
    with open(path, "rb") as f:
        source = f.read()
    # Named by its place in the archive (not the build path: reproducible; and never a path relative to
    # where a traceback is printed, which linecache would read instead).
    code = compile(source, "bluegreen.pyz/" + name, "exec", dont_inherit=True, optimize=0)
    pyc = _code_to_hash_pyc(code, importlib.util.source_hash(source), False)
    out[name] = base64.b64encode(bytes(pyc)).decode("ascii")
json.dump(out, sys.stdout)
"""


def bytecode(sources: list[tuple[str, Path]]) -> dict[str, bytes]:
    """Each module's code as zipimport reads `NAME.pyc`: unchecked-hash (no timestamp: reproducible; zipimport
    neither stats nor hashes the source), compiled by this Python in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _COMPILER], input=json.dumps([(n, str(p)) for n, p in sources]),
                          stdout=subprocess.PIPE, text=True, check=True)
    return {name: base64.b64decode(data) for name, data in json.loads(proc.stdout).items()}


def build(output: Path, src: Path = HERE, *, with_bytecode: bool = True) -> Path:
    """Write the archive to `output` atomically and return its path."""
    files = [(path.relative_to(src).as_posix(), path) for path in package_files(src)]
    compiled = bytecode([(n, p) for n, p in files if n.endswith(".py")]) if with_bytecode else {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _add(zf, "__main__.py", MAIN)
        for name, path in files:
            _add(zf, name, path.read_bytes())
            if name in compiled:
                _add(zf, name + "c", compiled[name])
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(SHEBANG + buf.getvalue())
    tmp.chmod(0o755)
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", "-o", type=Path, default=HERE / "dist" / "bluegreen.pyz")
    parser.add_argument("--no-bytecode", action="store_true", help="sources only (every Python compiles them at each start)")
    args = parser.parse_args(argv)
    out = build(args.output, with_bytecode=not args.no_bytecode)
    what = "sources only" if args.no_bytecode else f"bytecode for CPython {sys.version_info[0]}.{sys.version_info[1]}"
    print(f"built {out} ({out.stat().st_size} bytes, {what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
