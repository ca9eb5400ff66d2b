"""Build dist/bluegreen.pyz: a reproducible zipapp of the pure-Python package, standard library only."""

from __future__ import annotations

import argparse
import io
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


def build(output: Path, src: Path = HERE) -> Path:
    """Write the archive to `output` atomically and return its path."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _add(zf, "__main__.py", MAIN)
        for path in package_files(src):
            _add(zf, path.relative_to(src).as_posix(), path.read_bytes())
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(SHEBANG + buf.getvalue())
    tmp.chmod(0o755)
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", "-o", type=Path, default=HERE / "dist" / "bluegreen.pyz")
    args = parser.parse_args(argv)
    out = build(args.output)
    print(f"built {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
