"""Regenerate ray_alpcrun/_proto from proto/ghpc.proto.

python scripts/gen_proto.py           # rewrite the committed files
python scripts/gen_proto.py --check   # exit 1 if they drifted (used by tests)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "ray_alpcrun" / "_proto"
GENERATED = ("ghpc_pb2.py", "ghpc_pb2.pyi")


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(PROTO_DIR / "ghpc.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_DIR)
        print(f"wrote {', '.join(GENERATED)} to {OUT_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drifted = [
            name
            for name in GENERATED
            if (Path(tmp) / name).read_text() != (OUT_DIR / name).read_text()
        ]
    if drifted:
        print(f"generated code drifted from proto/ghpc.proto: {drifted}; run scripts/gen_proto.py")
        return 1
    print("generated code matches proto/ghpc.proto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
