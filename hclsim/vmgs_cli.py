"""`hclsim vmgs PATH`: what a VM's VMGS holds (vmgstool's dump-headers and read, for hclsim's
unencrypted VMGS), read-only. PATH is a state folder (`--state DIR`: its hclsim.vmgs) or a file.

    hclsim vmgs vm1/                       # the active header and the files
    hclsim vmgs vm1/ --read 3 --out nv.bin # TPM_NVRAM's bytes
"""
import json
import os
import sys

from hclsim import HclsimError
from hclsim.hcl import vmgs


def add_parser(sub) -> None:
    p = sub.add_parser("vmgs", help="show a VM's VMGS (the --state folder's hclsim.vmgs) or read one of its files")
    p.add_argument("path", metavar="PATH", help="a --state folder or a VMGS file")
    p.add_argument("--read", type=int, metavar="FILE_ID", help="write that file's bytes (e.g. 3, TPM_NVRAM)")
    p.add_argument("--out", metavar="FILE", help="with --read: to FILE (default: standard output)")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=cmd_vmgs)


def cmd_vmgs(args) -> int:
    from hclsim.state_dir import VMGS_FILE
    path = os.path.join(args.path, VMGS_FILE) if os.path.isdir(args.path) else args.path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HclsimError(f"{path}: {exc.strerror}") from None
    try:
        slot, header, _ = vmgs.read_headers(fd)
        if header is None:
            if args.read is not None:
                raise HclsimError(f"{path}: a blank VMGS disk (never formatted): no file {args.read}")
            print(json.dumps({"path": path, "blank": True}) if args.json else f"{path}: blank (never formatted)")
            return 0
        store = vmgs.Vmgs(fd)
        if args.read is not None:
            data = store.read_file(args.read)
            if data is None:
                raise HclsimError(f"{path}: file {args.read} ({vmgs.FILE_NAMES.get(args.read, '?')}) was never written")
            if args.out:
                with open(args.out, "wb") as f:
                    f.write(data)
            else:
                sys.stdout.buffer.write(data)
            return 0
        files = {i: (store.table[i][0], n) for i, n in sorted(store.files().items())}
        if args.json:
            print(json.dumps({"path": path, "version": "3.0", "capacity": store.capacity_blocks * vmgs.BLOCK,
                              "header": slot, "sequence": header[3],
                              "files": {str(i): {"name": vmgs.FILE_NAMES.get(i, ""), "bytes": n, "block": b}
                                        for i, (b, n) in files.items()}}, indent=2))
            return 0
        print(f"{path}: VMGS 3.0, {store.capacity_blocks * vmgs.BLOCK // 1024} KiB, active header {slot} "
              f"(sequence {header[3]}), {len(files)} file{'s' if len(files) != 1 else ''}")
        for i, (block, n) in files.items():
            print(f"  {vmgs.FILE_NAMES.get(i, '?'):<12} ({i:2d}) {n:8d} bytes at block {block}")
        return 0
    except vmgs.VmgsError as exc:
        raise HclsimError(f"{path}: {exc}") from None
    finally:
        os.close(fd)
